"""First-order sensitivity of linear modules, S_w = E|W ⊙ ∇_W ℓ| (TsqLoRA; AdaLoRA's family), and the
initial ranks it gives.

The gradient with respect to a module's (effective) weight is never stored: a forward hook keeps
the module's input x, a hook on its output receives δ = ∂ℓ/∂y, and G = Σ_t δ_t x_tᵀ is formed,
used and dropped one module at a time, so the base weights need no ``requires_grad`` (which in
training would make the Trainer clip and store gradients it does not own). For a PEFT LoRA layer
the weight is the effective one, W₀ + s·BA, and the probe also scores each LoRA direction i by
|⟨G, s·b_i a_iᵀ⟩|, the first-order change of the loss if that direction were removed (equal to
|⟨B[:, i], ∇B[:, i]⟩| = |⟨A[i], ∇A[i]⟩|): the directions to drop first when the module shrinks.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..calibration.model_state import ModelState
from ..calibration.targets import module_dims, module_weight, resolve_targets
from ..scoring.rules import allocate_sra


def lora_parts(module: nn.Module, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(A, B, scale) of a PEFT LoRA layer's adapter, or None for a plain linear layer."""
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None or adapter_name not in lora_a:
        return None
    return lora_a[adapter_name].weight, module.lora_B[adapter_name].weight, float(module.scaling[adapter_name])


class SensitivityProbe:
    """Accumulates S_w = mean |W ⊙ G| per module (and, for LoRA layers, the direction scores) over every
    backward pass while attached. With ``training_only`` it ignores modules in eval mode (the
    quality scorer's own passes)."""

    def __init__(self, modules: Mapping[str, nn.Module], adapter_name: str = "default",
                 training_only: bool = False, force_grad: bool = False) -> None:
        self.modules = dict(modules)
        self.adapter_name = adapter_name
        self.training_only = training_only
        # force_grad: in a frozen model no output needs a gradient; adding this zero leaf makes it need one
        # (y + 0 = y exactly), and the gradient then flows through every frozen layer as usual
        self.force_grad = force_grad
        self._zero = torch.zeros((), requires_grad=True)
        self._handles: list = []
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {n: 0.0 for n in self.modules}
        self.calls: dict[str, int] = {n: 0 for n in self.modules}
        self.directions: dict[str, torch.Tensor] = {}

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        if not self._handles:
            self._handles = [m.register_forward_hook(self._forward_hook(n)) for n, m in self.modules.items()]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _forward_hook(self, name: str) -> Callable[..., torch.Tensor | None]:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if (self.training_only and not module.training) or not torch.is_grad_enabled() \
                    or not isinstance(output, torch.Tensor):
                return None
            if not output.requires_grad:
                if not self.force_grad:
                    return None
                output = output + self._zero.to(output.dtype)
            x = inputs[0].detach()
            output.register_hook(lambda grad: self._record(name, module, x, grad))
            return output
        return hook

    @torch.no_grad()
    def _record(self, name: str, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
        d_in = x.shape[-1]
        g = grad.reshape(-1, grad.shape[-1]).float()
        grad_w = g.T @ x.reshape(-1, d_in).float()  # ∇_W ℓ in (d_out, d_in), this call's tokens
        parts = lora_parts(module, self.adapter_name)
        base = getattr(module, "base_layer", module)
        weight = module_weight(base).float()
        score = None
        if parts is not None:
            a, b, scale = parts
            weight = weight + scale * (b.float() @ a.float())
            score = scale * ((b.float().T @ grad_w) * a.float()).sum(1).abs()
        value = float((weight * grad_w).abs().mean())
        if not math.isfinite(value):  # an fp16 overflow step (the grad scaler skips it): nothing to learn from
            return
        if score is not None:
            self.directions[name] = self.directions.get(name, 0) + score.cpu().double()
        self.sums[name] += value
        self.calls[name] += 1

    def scores(self) -> dict[str, float]:
        """Mean |W ⊙ ∇W| per recorded pass (0 for a module that saw none)."""
        return {n: self.sums[n] / self.calls[n] if self.calls[n] else 0.0 for n in self.modules}

    def direction_scores(self, name: str) -> torch.Tensor | None:
        """Mean |⟨G, s·b_i a_iᵀ⟩| of each of the module's LoRA directions, or None if not recorded."""
        total = self.directions.get(name)
        return None if total is None else total / max(1, self.calls[name])


def first_order_sensitivity(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
                            target_modules: str | Sequence[str] | None = None) -> dict[str, float]:
    """S_w = mean over batches of mean_ij |W_ij · ∂ℓ/∂W_ij| for every target module of ``model``
    (labelled batches on the model's device; ℓ is the model's own loss). The model comes back
    exactly as it was (modes, flags, no ``.grad`` left)."""
    targets = resolve_targets(model, target_modules)
    state = ModelState.capture(model)
    probe = SensitivityProbe({t: model.get_submodule(t) for t in targets}, force_grad=True)
    seen = 0
    try:
        for p in model.parameters():  # no weight needs a gradient: the probe forms each module's G itself
            p.requires_grad_(False)
        model.eval()
        probe.attach()
        for batch in batches:
            if "labels" not in batch:
                raise ValueError("first-order sensitivity needs labelled batches (a 'labels' entry in each)")
            with torch.enable_grad():
                loss = model(**batch).loss
                loss.backward()
            seen += 1
    finally:
        probe.detach()
        probe._zero.grad = None
        state.restore()
    if seen == 0:
        raise ValueError("no batches: first-order sensitivity needs at least one labelled batch")
    return probe.scores()


def rank_cap(dims: tuple[int, int], avg_rank: float, rho: float) -> int:
    """A module's largest rank: min(d_in, d_out, ⌊ρ·r̄⌋) (ρ = inf: no cap but the shape, as the allocation's)."""
    if math.isinf(rho):
        return min(dims)
    return min(min(dims), int(rho * avg_rank))


def ranks_from_scores(scores: Mapping[str, float], dims: Mapping[str, tuple[int, int]], avg_rank: float,
                      rho: float = 4.0, r_min: int = 1, budget: int | None = None) -> dict[str, int]:
    """r ∝ S within [r_min, min(d_in, d_out, ⌊ρ·r̄⌋)], integer, Σ r = round(r̄·M) (or ``budget``): the
    package's SRA rule (docs/method.md §5) with the first-order sensitivity as θ."""
    names = list(scores)
    caps = np.array([rank_cap(dims[n], avg_rank, rho) for n in names], dtype=np.int64)
    theta = np.array([max(0.0, float(scores[n])) for n in names])
    ranks = allocate_sra(theta, avg_rank, r_min=r_min, r_max=caps, budget=budget)
    return {n: int(r) for n, r in zip(names, ranks)}


def initial_ranks(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], avg_rank: float,
                  target_modules: str | Sequence[str] | None = None, scores: str = "first-order",
                  rho: float = 4.0) -> dict[str, int]:
    """TsqLoRA's initial ranks {module: r}: SRA on the first-order sensitivity (``"first-order"``), or the
    package's Hessian allocation (``"hessian"``, labels unused). ``avg_rank``, ``scores`` and whether the
    budget fits the layers' shapes are checked before any forward or backward pass."""
    from ..settings import check_avg_rank, check_rho

    check_avg_rank(avg_rank)
    check_rho(rho)  # the allocation's rule: "4" or NaN would otherwise fail inside the cap arithmetic
    if scores not in ("first-order", "hessian"):
        raise ValueError(f"scores must be 'first-order' or 'hessian', got {scores!r}")
    targets = resolve_targets(model, target_modules)
    # the rule on equal scores: raises for a budget the shapes cannot hold, from the shapes alone
    ranks_from_scores({n: 1.0 for n in targets}, {n: module_dims(model.get_submodule(n)) for n in targets},
                      avg_rank, rho)
    if scores == "first-order":
        sensitivity = first_order_sensitivity(model, batches, target_modules)
        dims = {n: module_dims(model.get_submodule(n)) for n in sensitivity}
        return ranks_from_scores(sensitivity, dims, avg_rank, rho)
    if scores == "hessian":
        from ..api import compute_allocation

        unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
        return compute_allocation(model, unlabelled, avg_rank, target_modules=target_modules, progress=False,
                                  rho=rho).ranks()
    raise ValueError(f"scores must be 'first-order' or 'hessian', got {scores!r}")
