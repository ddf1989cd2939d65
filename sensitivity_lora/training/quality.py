"""TsqLoRA's per-sample quality score Q(x) = α₁·‖∇ℓ(x)‖² + α₂·Δℓ(x) + α₃·ΔC(x) over the trainable parameters.

- ‖∇ℓ(x)‖²: the squared norm of the sample's gradient (:mod:`.per_sample`, one batched pass).
- Δℓ(x) = ℓ(x; θ) − ℓ(x; θ − η∇ℓ(x)): the loss drop after one SGD step on the sample. To first
  order it is η‖∇ℓ(x)‖², an affine image of term 1 that the per-pool normalisation below maps onto
  term 1 exactly, so the first-order estimate would only add α₂ to α₁. The default (``"exact"``)
  therefore takes the real step, for every sample at once in one batched forward with per-sample
  weights: what it adds is the curvature, −(η²/2)∇ℓᵀH∇ℓ + …, which lowers the score of samples
  whose large gradient points up a steep wall (outliers, mislabelled rows). ``"first-order"`` is
  the cheap variant, kept for comparison.
- ΔC(x), the convergence term (not public; this is our choice): the first-order drop of the *other*
  candidates' mean loss after a step on x, ⟨∇ℓ(x), ḡ₋ₓ⟩ with ḡ₋ₓ the mean gradient of the other
  samples of its scoring chunk (the chunks are random subsets of the pool). Term 2 asks whether a
  step on x helps x; this one asks whether it moves the training objective towards convergence,
  which separates samples that carry the common signal from idiosyncratic ones with the same
  gradient norm. It comes from the Gram matrix of the per-sample gradients, at no extra pass.

Each term is z-normalised across the pool (mean 0, standard deviation 1; a constant term is 0)
before the α's weight it, so the α's are comparable whatever the loss scale.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Real
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .checks import check_positive_int, check_positive_number, check_seed, check_temperature
from .per_sample import SampleLossFn, losses_after_steps, per_sample_gradients

MakeBatch = Callable[[Sequence[int]], Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class QualityConfig:
    """How the quality score is computed and when it is refreshed.

    alphas: (α₁, α₂, α₃), the weights of the normalised gradient-norm, loss-drop and convergence terms.
    temperature: τ of the sampler, p(x) = softmax(Q/τ); ``math.inf`` is uniform sampling; ``"auto"``
      (default) sets τ at each refresh so the draw's effective sample size is ``ess_fraction`` of the
      pool (a fixed τ = 1 concentrated MiniLM/BBC training on a few rows and collapsed it).
    ess_fraction: the effective sample size 1/Σp² that ``"auto"`` keeps, as a fraction of the pool.
    refresh_every: K, the optimiser steps between two scorings.
    pool_size: the candidates scored at each refresh (drawn uniformly, without replacement), or None
      for the whole training set; the sampler draws from the latest pool. A refresh costs about two
      training steps' compute per ``batch`` rows (forward, backward, stepped forward), so scoring
      adds roughly 2·pool_size / (refresh_every · batch size) to the training time.
    chunk_size: rows per scoring forward/backward (memory: chunk_size × trainable parameters floats);
      ΔC compares a sample with the other rows of its chunk.
    step_size: η of Δℓ; ``"auto"`` takes η = 0.1 · median ℓ / median ‖∇ℓ‖² of each refresh's first
      chunk, a step that removes about 10 % of a typical sample's loss to first order, large enough
      that curvature shows.
    delta_loss: ``"exact"`` (the real step) or ``"first-order"`` (η‖∇ℓ‖², redundant with term 1).
    seed: seeds the pools and the draws.
    """

    alphas: tuple[float, float, float] = (1.0, 1.0, 1.0)
    temperature: float | str = "auto"
    ess_fraction: float = 0.5
    refresh_every: int = 50
    pool_size: int | None = 64
    chunk_size: int = 16
    step_size: float | str = "auto"
    delta_loss: str = "exact"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.alphas, str) or not isinstance(self.alphas, Iterable):
            raise ValueError(f"alphas must be three non-negative finite numbers (α₁, α₂, α₃), got {self.alphas!r}")
        alphas = tuple(self.alphas)
        if len(alphas) != 3 or not all(isinstance(a, Real) and not isinstance(a, bool) and math.isfinite(a)
                                       and a >= 0 for a in alphas):
            raise ValueError(f"alphas must be three non-negative finite numbers (α₁, α₂, α₃), got {self.alphas!r}")
        object.__setattr__(self, "alphas", tuple(float(a) for a in alphas))
        check_temperature(self.temperature, self.ess_fraction)
        check_positive_int("refresh_every", self.refresh_every)
        check_positive_int("chunk_size", self.chunk_size)
        check_positive_int("pool_size", self.pool_size, allow_none=True)
        if self.step_size != "auto":
            check_positive_number("step_size", self.step_size)
        if self.delta_loss not in ("exact", "first-order"):
            raise ValueError(f"delta_loss must be 'exact' or 'first-order', got {self.delta_loss!r}")
        check_seed("seed", self.seed)


@dataclass
class QualityTerms:
    """The raw terms of every scored candidate, their normalised combination Q, and the η used."""

    indices: list[int]
    losses: torch.Tensor
    grad_sq: torch.Tensor
    delta_loss: torch.Tensor
    convergence: torch.Tensor
    step_size: float
    seconds: float = 0.0

    def score(self, alphas: Sequence[float]) -> torch.Tensor:
        """Q = Σ α_k · z(term_k), z the z-score across the pool."""
        a1, a2, a3 = alphas
        return a1 * normalise(self.grad_sq) + a2 * normalise(self.delta_loss) + a3 * normalise(self.convergence)


def normalise(values: torch.Tensor) -> torch.Tensor:
    """(v − mean) / std across the pool; zeros when the values are (numerically) constant or there is one."""
    values = values.double()
    if values.numel() < 2:
        return torch.zeros_like(values)
    centred = values - values.mean()
    std = centred.pow(2).mean().sqrt()
    if not torch.isfinite(std) or std <= 1e-12 * max(1.0, float(values.abs().max())):
        return torch.zeros_like(values)
    return centred / std


def auto_step_size(losses: torch.Tensor, grad_sq: torch.Tensor) -> float:
    g = float(grad_sq.median())
    return 0.1 * float(losses.median()) / g if g > 0 else 0.0


def chunks(indices: Sequence[int], size: int) -> list[list[int]]:
    """``indices`` cut into ⌈n/size⌉ nearly equal runs (no chunk of one row unless n = 1, so ΔC exists)."""
    count = max(1, math.ceil(len(indices) / size))
    base, extra = divmod(len(indices), count)
    out, start = [], 0
    for i in range(count):
        stop = start + base + (1 if i < extra else 0)
        out.append(list(indices[start:stop]))
        start = stop
    return [c for c in out if c]


def score_candidates(model: nn.Module, make_batch: MakeBatch, indices: Sequence[int], config: QualityConfig,
                     loss_fn: SampleLossFn | None = None) -> QualityTerms:
    """The three terms for the candidates ``indices`` (``make_batch(rows)`` gives a labelled batch on the
    model's device). The model is scored in eval mode (no dropout) and left in the mode it was in.
    Chunks are consecutive runs of ``indices`` and ΔC compares rows within a chunk, so pass them in
    random order (the sampler's pools are), not sorted by class or source."""
    import time

    if not indices:
        raise ValueError("no candidates to score: the pool is empty")
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"losses": [], "grad_sq": [], "delta_loss": [], "convergence": []}
    eta = None if config.step_size == "auto" else float(config.step_size)
    try:
        for rows in chunks(indices, config.chunk_size):
            batch = make_batch(rows)
            grads = per_sample_gradients(model, batch, loss_fn)
            grad_sq = grads.sq_norms()
            if eta is None:
                eta = auto_step_size(grads.losses, grad_sq)
            if config.delta_loss == "exact":
                after = losses_after_steps(model, batch, grads, torch.full_like(grad_sq, eta), loss_fn)
                drop = grads.losses - after
            else:
                drop = eta * grad_sq
            gram = grads.gram()
            n = gram.shape[0]
            others = (gram.sum(1) - gram.diagonal()) / (n - 1) if n > 1 else torch.zeros(n)
            for key, value in zip(parts, (grads.losses, grad_sq, drop, others)):
                parts[key].append(value.detach().cpu().double())
            del grads, gram
    finally:
        model.train(was_training)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return QualityTerms(list(indices), cat["losses"], cat["grad_sq"], cat["delta_loss"], cat["convergence"],
                        float(eta), time.perf_counter() - start)
