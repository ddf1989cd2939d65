"""Change the rank of one PEFT LoRA layer during training, carrying the optimiser with it.

A direction i of a LoRA layer is the pair (row i of A, column i of B); its update is s·b_i a_iᵀ.
Kept directions keep their values and their optimiser state (Adam's moments, SGD's momentum: every
state tensor shaped like the parameter) exactly; new directions start as PEFT starts a layer
(a_i Kaiming-uniform, b_i = 0, so the model's function does not change) with zero state. The
scale s is kept, alpha_w = s·r_w (s·√r_w with rsLoRA), so the kept directions' contribution to
the output is unchanged; only the removed directions' s·b_i a_iᵀ leaves the model.

Adam keeps one step count per tensor, so new directions share the count of the kept ones: their
zero moments are not bias-corrected, and for the first few hundred steps their updates are up
to a few times larger than a fresh Adam's (m̂/√v̂ starts at (1−β₁)/√(1−β₂) ≈ 3.2, not 1).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimiser inside wrappers (accelerate's AcceleratedOptimizer keeps it in ``.optimizer``)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"expected a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}")
    return optimizer


def check_resizable(layer: nn.Module, adapter_name: str) -> None:
    from peft.tuners.lora.layer import Linear

    if not isinstance(layer, Linear) or adapter_name not in layer.lora_A:
        raise ValueError(f"dynamic ranks support PEFT LoRA Linear layers, got {type(layer).__name__}")
    if layer.use_dora.get(adapter_name, False) or adapter_name in getattr(layer, "lora_variant", {}):
        raise ValueError("dynamic ranks do not support LoRA variants (DoRA, ...): their magnitude vectors "
                         "depend on the rank's directions")
    if layer.merged:
        raise ValueError("the LoRA layer is merged into its base weight: unmerge it before changing its rank")


def _resized(old: torch.Tensor, keep: torch.Tensor, fresh: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.cat([old.index_select(dim, keep.to(old.device)), fresh.to(old)], dim)


def _carried_state(optimizer: torch.optim.Optimizer | None, old: nn.Parameter, keep: torch.Tensor, n_new: int,
                   dim: int) -> dict[str, Any] | None:
    """The optimiser state of ``old``'s replacement (kept slices, zeros for new ones); checks only, changes nothing."""
    if optimizer is None:
        return None
    if not any(p is old for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("a LoRA parameter is not in the optimiser: create the optimiser over the adapter's "
                         "parameters before changing ranks")
    carried = {}
    for key, value in (optimizer.state.get(old) or {}).items():
        if isinstance(value, torch.Tensor) and value.shape == old.shape:
            shape = list(value.shape)
            shape[dim] = n_new
            carried[key] = _resized(value, keep, torch.zeros(shape, dtype=value.dtype), dim)
        elif isinstance(value, torch.Tensor) and value.dim() > 0:
            raise ValueError(f"optimiser state {key!r} has shape {tuple(value.shape)}, not the parameter's "
                             f"{tuple(old.shape)}: this optimiser's state cannot be carried across a rank change")
        else:
            carried[key] = value  # the step count and other scalars
    return carried


def _swap_in_optimizer(optimizer: torch.optim.Optimizer | None, old: nn.Parameter, new: nn.Parameter,
                       carried: dict[str, Any] | None) -> None:
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
    had_state = bool(optimizer.state.pop(old, None))
    if had_state:
        optimizer.state[new] = carried


def prepare_resize(layer: nn.Module, adapter_name: str, keep: torch.Tensor, new_rank: int,
                   optimizer: Any = None, generator: torch.Generator | None = None) -> Callable[[], None]:
    """Every check and every new tensor of :func:`resize_lora_layer`, with nothing changed yet: the returned
    function commits the change. A caller resizing several layers prepares them all first, so an error in
    any leaves the model and the optimiser as they were."""
    check_resizable(layer, adapter_name)
    keep = torch.as_tensor(keep, dtype=torch.long).flatten()
    rank = int(layer.r[adapter_name])
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= rank or keep.unique().numel() != keep.numel()):
        raise ValueError(f"keep must hold distinct direction indices in [0, {rank}), got {keep.tolist()}")
    if not keep.numel() <= new_rank or new_rank < 1:
        raise ValueError(f"new_rank must be ≥ 1 and ≥ the {keep.numel()} kept directions, got {new_rank}")
    opt = inner_optimizer(optimizer) if optimizer is not None else None
    lin_a, lin_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    a, b = lin_a.weight, lin_b.weight
    n_new = new_rank - keep.numel()
    state_a, state_b = _carried_state(opt, a, keep, n_new, 0), _carried_state(opt, b, keep, n_new, 1)
    fresh_a = torch.empty(n_new, a.shape[1], dtype=torch.float32)
    if n_new:  # PEFT's own init of A (kaiming_uniform_, a = √5); B = 0 keeps the function
        nn.init.kaiming_uniform_(fresh_a, a=math.sqrt(5), generator=generator)
    with torch.no_grad():
        new_a = nn.Parameter(_resized(a.detach(), keep, fresh_a, 0), requires_grad=a.requires_grad)
        new_b = nn.Parameter(_resized(b.detach(), keep, torch.zeros(b.shape[0], n_new), 1),
                             requires_grad=b.requires_grad)
    scale = float(layer.scaling[adapter_name])
    alpha = scale * (math.sqrt(new_rank) if layer.use_rslora.get(adapter_name, False) else new_rank)

    def commit() -> None:
        _swap_in_optimizer(opt, a, new_a, state_a)
        _swap_in_optimizer(opt, b, new_b, state_b)
        lin_a.weight, lin_a.out_features = new_a, new_rank
        lin_b.weight, lin_b.in_features = new_b, new_rank
        layer.r[adapter_name] = new_rank
        layer.lora_alpha[adapter_name] = alpha

    return commit


def resize_lora_layer(layer: nn.Module, adapter_name: str, keep: torch.Tensor, new_rank: int,
                      optimizer: Any = None, generator: torch.Generator | None = None) -> None:
    """Give ``layer`` rank ``new_rank``: the directions ``keep`` (indices, in this order) stay, the rest go,
    ``new_rank − len(keep)`` fresh ones are appended. ``optimizer`` (if given) follows the parameters; on an
    error nothing has changed."""
    prepare_resize(layer, adapter_name, keep, new_rank, optimizer, generator)()
