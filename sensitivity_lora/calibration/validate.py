"""Checks at the boundary, before any work: devices, backends, the model, the calibration batches.

Every check raises an error of ``sensitivity_lora.errors`` that names the problem and the fix;
nothing here changes the model or reads more than token ids and shapes.
"""
from __future__ import annotations

from numbers import Integral
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .. import ops
from ..errors import CalibrationError, DataError, ModelError

# Path components PEFT gives the parts of a LoRA layer; a model holding them already has adapters.
ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "base_layer")
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")


def check_device(device: Any, what: str = "device") -> torch.device | None:
    """``device`` as a ``torch.device`` that can hold data here (None stays None)."""
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, Integral)):
        raise ValueError(f"{what}={device!r} must be a device name such as 'cpu' or 'cuda:0', or a torch.device")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"{what}={device!r} is not a device torch knows ({exc}); use e.g. 'cpu', 'cuda' "
                         "or 'cuda:1'") from None
    if parsed.type == "meta":
        raise ValueError(f"{what}='meta' holds no data, so nothing can be calibrated on it: use a real device "
                         "('cpu', 'cuda')")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}={device!r}: CUDA is not available here (torch {torch.__version__}); "
                             "use 'cpu', or install a CUDA build of torch")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{what}={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type != "cpu":
        module = getattr(torch, parsed.type, None)
        is_available = getattr(module, "is_available", None)
        if callable(is_available) and not is_available():
            raise ValueError(f"{what}={device!r}: the {parsed.type} backend is not available here")
    return parsed


def check_backend_name(backend: Any, name: str = "backend") -> None:
    """A kernel backend named for later use (None or "auto": the best available); whether it runs on the
    devices of a run is :func:`check_backend`'s question."""
    if backend is not None and (not isinstance(backend, str) or backend not in ("auto",) + ops.BACKENDS):
        raise ValueError(f"{name} must be None or one of auto, {', '.join(ops.BACKENDS)}, got {backend!r}")


def check_backend(backend: str | None, devices: Iterable[torch.device], hessian: str) -> None:
    """A forced kernel backend must exist for every op the run needs on every device it runs on."""
    check_backend_name(backend)  # 0, False or "" would otherwise read as "auto"
    needed = ["accumulate_sumsq", "diag_stats"] + (["accumulate_xtx"] if hessian == "full" else [])
    for device in devices:
        for op in needed:  # the statistics live, and are scored, where the activations are
            ops.resolve_backend(op, device, backend)


def adapter_modules(model: nn.Module) -> list[str]:
    """Names of the modules that belong to LoRA adapters already attached to ``model``."""
    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if any(p in ADAPTER_PARTS for p in parts) or (hasattr(module, "base_layer") and hasattr(module, "lora_A")):
            found.append(name)
    return found


def check_model(model: Any) -> None:
    """A module with real weights and no LoRA adapters of its own."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    adapters = adapter_modules(model)
    if adapters:
        raise ModelError(
            f"this model already holds LoRA adapters ({len(adapters)} adapter modules, e.g. {adapters[0]}); "
            "calibrating it would measure the adapters' pieces as if they were weight matrices. Calibrate the "
            "base model: merge the adapters into it (peft_model.merge_and_unload()) or take them out "
            "(peft_model.unload()) first")
    for name, module in model.named_modules():
        if hasattr(module, "_hf_hook"):  # accelerate moves offloaded weights in for each forward
            continue
        for pname, param in list(module._parameters.items()) + list(module._buffers.items()):
            if param is not None and param.is_meta:
                full = f"{name}.{pname}" if name else pname
                raise ModelError(f"the model's weights are on the meta device (e.g. {full}): they were never "
                                 "loaded. Load the model with real weights (no init_empty_weights, a real "
                                 "device_map) before calibrating")
    if not any(True for _ in model.parameters()):
        raise ModelError("the model has no parameters: there is nothing to calibrate")


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's config admits (None when it does not say)."""
    config = getattr(model, "config", None)
    for name in _POSITION_FIELDS:
        value = getattr(config, name, None) if config is not None else None
        if isinstance(value, Integral) and not isinstance(value, bool) and value > 0:
            return int(value)
    return None


def vocab_size(model: nn.Module) -> int | None:
    """The number of token ids the input embedding takes (None when it cannot be found)."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            embedding = get()
        except (NotImplementedError, AttributeError):
            embedding = None
        if isinstance(embedding, nn.Embedding):
            return int(embedding.num_embeddings)
    value = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(value) if isinstance(value, Integral) and value > 0 else None


def check_batches(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> list:
    """The batches as a list, each checked: structure, dtypes, shapes, ids in the vocabulary, length within
    the model's positions, some real tokens. Raises before the first forward pass."""
    if isinstance(batches, Mapping):
        raise CalibrationError("batches must be a list (or iterable) of batches, not one batch: wrap it in a list")
    try:
        batches = list(batches)
    except TypeError:
        raise CalibrationError(f"batches must be an iterable of mappings, got {type(batches).__name__}") from None
    if not batches:
        raise CalibrationError("no calibration batches were given; pass at least one batch of text")
    vocab, positions = vocab_size(model), max_positions(model)
    for index, batch in enumerate(batches):
        _check_batch(batch, index, vocab, positions)
    return batches


def _check_batch(batch: Any, index: int, vocab: int | None, positions: int | None) -> None:
    if not isinstance(batch, Mapping) or ("input_ids" not in batch and "inputs_embeds" not in batch):
        raise CalibrationError(f"batch {index} must be a mapping with 'input_ids' (and optionally 'attention_mask')")
    ids = batch.get("input_ids")
    if ids is not None:
        if not isinstance(ids, torch.Tensor):
            raise DataError(f"batch {index}: input_ids is {type(ids).__name__}, not a tensor "
                            "(tokenize with return_tensors='pt', or use calibration_batches)")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise DataError(f"batch {index}: input_ids has dtype {ids.dtype}; token ids must be integers")
        if ids.dim() != 2 or ids.numel() == 0:
            raise DataError(f"batch {index}: input_ids has shape {tuple(ids.shape)}; it must be "
                            "(batch, sequence) with at least one token")
        if ids.device.type != "meta":
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or (vocab is not None and high >= vocab):
                raise DataError(f"batch {index}: token ids run from {low} to {high}, but the model's vocabulary "
                                f"has ids 0..{vocab - 1 if vocab else '?'}: was it tokenised with this model's "
                                "tokenizer?")
        shape = tuple(ids.shape)
    else:
        embeds = batch["inputs_embeds"]
        if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point() or embeds.dim() != 3:
            raise DataError(f"batch {index}: inputs_embeds must be a floating (batch, sequence, hidden) tensor")
        shape = tuple(embeds.shape[:2])
    if positions is not None and shape[1] > positions:
        raise DataError(f"batch {index} has {shape[1]} tokens per row, but the model takes at most {positions} "
                        f"positions (its config): use seq_len <= {positions}")
    mask = batch.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise DataError(f"batch {index}: attention_mask has shape {got}, input shape {shape}; they must match")
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise DataError(f"batch {index}: attention_mask has dtype {mask.dtype}; use 0/1 integers or booleans")
        if mask.device.type != "meta" and mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
            raise DataError(f"batch {index}: attention_mask holds values other than 0 and 1")
        if mask.device.type != "meta" and not bool(mask.to(torch.bool).any()):
            raise CalibrationError(f"batch {index} is all padding (attention_mask is 0 everywhere); "
                                   "drop empty samples")


def real_rows(mask: torch.Tensor | None, n_rows: int) -> int:
    """How many rows of a batch hold at least one real (unmasked) token."""
    if mask is None:
        return n_rows
    return int(mask.to(torch.bool).any(dim=1).sum())

