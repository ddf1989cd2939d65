"""Rank allocation by pruning the generated Λ: AdaLoRA's importance and budget schedule.

Importance of every generated entry t (of P, Λ and Q) is AdaLoRA's: the sensitivity
I = |t · ∂L/∂t|, its EMA Ī ← β₁ Ī + (1 − β₁) I, the uncertainty Ū ← β₂ Ū + (1 − β₂)|I − Ī|,
and the score Ī · Ū. A triplet's score is its Λ entry's plus the means of its P column's
and Q row's (PEFT's ``RankAllocator``). The tensors are generated, not parameters, so their
gradients are read by hooks during the backward pass. For Λ the gradient taken is the one
with respect to the *masked* value Λ ⊙ m, which is not zero for a pruned triplet: a triplet
pruned while the budget still shrinks keeps a score and can come back, as in AdaLoRA (whose
masked E entries keep receiving gradient).

Budget (AdaLoRA's schedule): all ``init_rank × n`` triplets for the first ``tinit`` steps, then
b(t) = ⌊(b₀ − b_T)(1 − (t − tinit)/(T − tfinal − tinit))³ + b_T⌋ with masks recomputed every
``delta_t`` steps, and from step T − tfinal the final mask of exactly b_T = ``avg_rank × n``
triplets, fixed. Masks keep the global top-b scores (ties by module order then index, so the
count is exact and the result deterministic).
"""
from __future__ import annotations

from typing import Mapping

import torch

from .config import HyperAdaLoraConfig


class RankAllocator:
    """Importance EMAs per generated tensor and the masks they decide, for modules ``names``."""

    def __init__(self, names: list[str], config: HyperAdaLoraConfig) -> None:
        self.names = list(names)
        self.config = config
        self.init_budget = config.init_rank * len(self.names)
        self.target_budget = config.avg_rank * len(self.names)
        self.final = False  # the final mask is set and fixed
        self._values: dict[str, tuple[torch.Tensor, ...]] = {}
        self._grads: dict[str, list[torch.Tensor | None]] = {}
        self._ema_ipt: dict[str, list[torch.Tensor]] = {}
        self._ema_unc: dict[str, list[torch.Tensor]] = {}

    # -- reading the gradients of generated tensors ---------------------------------------
    def watch(self, name: str, p: torch.Tensor, lam: torch.Tensor, lam_masked: torch.Tensor, q: torch.Tensor) -> None:
        """Record this forward's P, Λ, Q and hook their gradients (summed over micro-batches until used)."""
        self._values[name] = (p.detach(), lam.detach(), q.detach())
        grads = self._grads.setdefault(name, [None, None, None])

        def keep(slot: int):
            def hook(grad: torch.Tensor) -> None:
                grads[slot] = grad.detach() if grads[slot] is None else grads[slot] + grad.detach()
            return hook

        for slot, tensor in enumerate((p, lam_masked, q)):
            if tensor.requires_grad:
                tensor.register_hook(keep(slot))

    def update_importance(self) -> bool:
        """Fold the gradients read since the last call into the EMAs; False when there were none."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        updated = False
        for name, grads in self._grads.items():
            if any(g is None for g in grads) or name not in self._values:
                continue
            ipt = [(v.float() * g.float()).abs() for v, g in zip(self._values[name], grads)]  # fp32 EMAs
            if name not in self._ema_ipt:
                self._ema_ipt[name] = [torch.zeros_like(t) for t in ipt]
                self._ema_unc[name] = [torch.zeros_like(t) for t in ipt]
            for k, value in enumerate(ipt):
                ema = self._ema_ipt[name][k].mul_(beta1).add_(value, alpha=1 - beta1)
                self._ema_unc[name][k].mul_(beta2).add_((value - ema).abs(), alpha=1 - beta2)
            updated = True
        self._grads.clear()
        return updated

    # -- the schedule and the masks -------------------------------------------------------
    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(the budget at ``step``, whether masks are recomputed at it), AdaLoRA's rule."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step >= c.total_steps - c.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - c.tinit) / (c.total_steps - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * remaining ** 3 + self.target_budget)
        return budget, step % c.delta_t == 0

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Every module's r triplet scores (zeros before any gradient was seen)."""
        out = {}
        for name in self.names:
            if name not in self._ema_ipt:
                out[name] = torch.zeros(self.config.init_rank)
                continue
            (s_p, s_lam, s_q) = [i * u for i, u in zip(self._ema_ipt[name], self._ema_unc[name])]
            out[name] = (s_lam + s_p.mean(dim=0) + s_q.mean(dim=1)).float().cpu()
        return out

    def mask_to_budget(self, masks: Mapping[str, torch.Tensor], budget: int) -> None:
        """Set ``masks`` (the layers' buffers, in place) to the global top-``budget`` triplets."""
        if not 0 <= budget <= self.init_budget:
            raise ValueError(f"budget {budget} outside [0, {self.init_budget}]")
        scores = self.triplet_scores()
        flat = torch.cat([scores[n] for n in self.names])
        order = torch.sort(flat, descending=True, stable=True).indices
        keep = torch.zeros_like(flat)
        keep[order[:budget]] = 1.0
        r = self.config.init_rank
        with torch.no_grad():
            for i, name in enumerate(self.names):
                masks[name].copy_(keep[i * r:(i + 1) * r].to(masks[name]))

    def update_and_allocate(self, masks: Mapping[str, torch.Tensor], step: int) -> int:
        """One optimiser step's work (call it after ``optimizer.step()``): the EMAs, then the masks
        if the schedule says so. Returns the budget now in force."""
        self.update_importance()
        if self.final:
            return self.target_budget
        budget, recompute = self.budget_schedule(step)
        if step >= self.config.total_steps - self.config.tfinal:
            self.finalize(masks)
        elif recompute:
            self.mask_to_budget(masks, budget)
        return budget

    def finalize(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Fix the final mask now: exactly ``avg_rank × n`` triplets, by the scores so far."""
        self.mask_to_budget(masks, self.target_budget)
        self.final = True
