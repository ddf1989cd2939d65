"""Running a model for calibration: its state preserved, batches checked, unneeded work skipped."""
from __future__ import annotations

import inspect
from typing import Iterable, Mapping

import torch
from torch import nn

from ..errors import CalibrationError
from .model_state import preserved_state  # noqa: F401  (re-exported: calibration runs inside it)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _accepts(model: nn.Module, argument: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return argument in params  # named explicitly: **kwargs may forward it somewhere that rejects it


def forward_kwargs(model: nn.Module, targets: Iterable[nn.Module] = ()) -> dict:
    """Arguments that skip work calibration does not need: the KV cache, and logits
    (only layer inputs are measured, so the LM head's vocabulary projection is wasted,
    unless the LM head is itself a target)."""
    extra = {}
    if _accepts(model, "use_cache"):
        extra["use_cache"] = False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if _accepts(model, "logits_to_keep") and not any(m is head for m in targets):
        extra["logits_to_keep"] = 1
    return extra


def prepare_batch(batch: Mapping[str, torch.Tensor], device: torch.device, index: int) -> tuple[dict, torch.Tensor | None]:
    """Move a batch to ``device`` and validate it; returns (model kwargs, attention mask)."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch and "inputs_embeds" not in batch:
        raise CalibrationError(f"batch {index} must be a mapping with 'input_ids' (and optionally 'attention_mask')")
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "labels"}
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.to(torch.bool).any()):
        raise CalibrationError(f"batch {index} is all padding (attention_mask is 0 everywhere); drop empty samples")
    return kwargs, mask


def run_model(model: nn.Module, kwargs: Mapping, index: int):
    """``model(**kwargs)``; an IndexError inside (an embedding or position table too small for the batch)
    becomes a CalibrationError naming the batch."""
    try:
        return model(**kwargs)
    except IndexError as exc:
        raise CalibrationError(f"the model's forward pass failed on batch {index} ({exc}): check that the token "
                               "ids and the sequence length fit the model (its vocabulary and positions)") from exc
