"""Which weight matrices get LoRA: target discovery in the style of PEFT's ``target_modules``."""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Sequence

from torch import nn

from ..errors import TargetError

if TYPE_CHECKING:
    import torch

try:  # GPT-2 style layers store the weight transposed
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()  # type: ignore[assignment]

LINEAR_TYPES = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


def module_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    raise TargetError(f"{type(module).__name__} is not a supported linear layer (nn.Linear or transformers Conv1D)")


def module_weight(module: nn.Module) -> "torch.Tensor":
    """The weight of a linear layer in nn.Linear's (d_out, d_in) layout (Conv1D stores it transposed)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.T
    raise TargetError(f"{type(module).__name__} is not a supported linear layer (nn.Linear or transformers Conv1D)")


def block_containers(model: nn.Module) -> list[str]:
    """Names of the ModuleLists that hold the repeated transformer blocks.

    A block list is a ModuleList of ≥ 2 modules of one class that contain linear
    layers; this finds ``model.layers``, ``transformer.h``, ``encoder.layer`` and
    the like without a table of names.
    """
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        classes = {type(child) for child in module}
        if len(classes) == 1 and any(isinstance(m, LINEAR_TYPES) for m in module[0].modules()):
            if not any(name.startswith(outer + ".") for outer in found):
                found.append(name)
    return found


def resolve_targets(model: nn.Module, target_modules: str | Sequence[str] | None = None) -> list[str]:
    """Full names of the target linear layers, in model order.

    ``None``: every linear layer inside the transformer blocks (never ``lm_head``
    or a classifier head). A string is a regex matched against the whole module
    name; a list holds names matched as PEFT does (equal, or a suffix after a dot).
    """
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, LINEAR_TYPES)]
    if target_modules is None:
        blocks = block_containers(model)
        if not blocks:
            raise TargetError(
                "could not find the transformer blocks of this model (no ModuleList of repeated layers); "
                "pass target_modules explicitly, e.g. ['q_proj', 'v_proj']"
            )
        names = [n for n, _ in linears if any(n.startswith(b + ".") for b in blocks)]
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise TargetError(f"target_modules regex {target_modules!r} is invalid: {exc}") from exc
        names = [n for n, _ in linears if pattern.fullmatch(n)]
    else:
        if isinstance(target_modules, (bytes, Mapping)) or not isinstance(target_modules, Iterable):
            raise TargetError(f"target_modules must be a regex string, a list of module names or None, "
                              f"got {target_modules!r}")
        keys = list(target_modules)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise TargetError("target_modules must be a regex string or a non-empty list of module names")
        names = [n for n, _ in linears if any(n == k or n.endswith("." + k) for k in keys)]
    if not names:
        sample = ", ".join(n for n, _ in linears[:6]) or "none"
        raise TargetError(
            f"no linear layer matches target_modules={target_modules!r}; "
            f"linear layers in this model include: {sample}"
        )
    return names
