"""TsqLoRA's sampler: training rows drawn with probability softmax(Q/τ) over the latest scored pool.

Draws are stochastic and with replacement (the paper's p(x) = softmax(Q/τ), not a top-k cut),
one at a time as the DataLoader asks for them, so a refresh takes effect on the next batch
the loader builds. τ = ∞ is uniform over the pool; pools are drawn uniformly from the whole
training set, so over many refreshes every row is equally likely to be a candidate. Two seeded
generators (pools, draws) make a run reproducible.

τ = ``"auto"`` (the default of :class:`~sensitivity_lora.training.quality.QualityConfig`) sets τ at
every refresh so that the draw keeps an effective sample size 1/Σp² of ``ess_fraction`` of the pool.
A fixed τ cannot be right for every pool: Q is a sum of three z-scores, its spread is 1 to 3 and
varies with how correlated the terms are, and for roughly Gaussian scores of spread σ the effective
fraction is about exp(−σ²/τ²). At τ = 1 and σ ≈ 2.5 that is 0.2 %: one or two rows are drawn again
and again, and a classifier trained on them collapses (measured on MiniLM/BBC, docs/results.md).
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from .checks import AUTO, Temperature, check_positive_int, check_seed, check_temperature

class QualitySampler(Sampler[int]):
    """Indices into a dataset of ``n_examples`` rows, drawn from softmax(Q/τ) over the current pool.

    ``pool_size`` None is the whole dataset. Before any scores are set the pool is sampled
    uniformly. ``num_samples`` (default ``n_examples``) is the length of one epoch. ``temperature``
    "auto" picks τ at each :meth:`set_scores` for an effective sample size of ``ess_fraction`` of the
    pool; ``last_temperature`` is the τ in use.
    """

    def __init__(self, n_examples: int, temperature: Temperature = AUTO, pool_size: int | None = None,
                 seed: int = 0, num_samples: int | None = None, ess_fraction: float = 0.5) -> None:
        check_positive_int("n_examples (the training rows)", n_examples)
        check_temperature(temperature, ess_fraction)
        check_positive_int("pool_size", pool_size, allow_none=True)
        check_positive_int("num_samples", num_samples, allow_none=True)
        check_seed("seed", seed)
        self.n_examples = n_examples
        self.temperature = temperature if temperature == AUTO else float(temperature)
        self.ess_fraction = float(ess_fraction)
        self.last_temperature = math.inf
        self.pool_size = min(pool_size or n_examples, n_examples)
        self.num_samples = n_examples if num_samples is None else int(num_samples)
        self._pools = torch.Generator().manual_seed(seed)
        self._draws = torch.Generator().manual_seed(seed + 1)
        self.pool: torch.Tensor = torch.arange(n_examples)
        self.probs: torch.Tensor = torch.full((n_examples,), 1.0 / n_examples, dtype=torch.float64)
        self.new_pool()

    def new_pool(self) -> list[int]:
        """Draw the next candidate pool (uniform, without replacement), sampled uniformly until scored. The
        pool is in random order, also when it is the whole set: scoring cuts it into consecutive chunks and
        compares each row with its chunk (ΔC), so a data set stored by class or by source must not give
        chunks of one class."""
        pool = torch.randperm(self.n_examples, generator=self._pools)[: self.pool_size]
        self.pool = pool
        self.probs = torch.full((len(pool),), 1.0 / len(pool), dtype=torch.float64)
        return pool.tolist()

    def set_scores(self, indices: Sequence[int], scores: torch.Tensor) -> None:
        """Sample the rows ``indices`` with probability softmax(scores/τ) from now on."""
        scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
        indices = torch.as_tensor(list(indices), dtype=torch.long)
        if indices.numel() == 0 or indices.numel() != scores.numel():
            raise ValueError(f"set_scores needs one score per index, got {indices.numel()} indices and "
                             f"{scores.numel()} scores")
        if not torch.isfinite(scores).all():
            raise ValueError("quality scores must be finite")
        if int(indices.min()) < 0 or int(indices.max()) >= self.n_examples:
            raise ValueError(f"indices must lie in [0, {self.n_examples})")
        self.pool = indices
        tau = (temperature_for_ess(scores, self.ess_fraction) if self.temperature == AUTO
               else float(self.temperature))
        self.last_temperature = tau
        self.probs = sampling_probabilities(scores, tau)

    def __iter__(self) -> Iterator[int]:
        for _ in range(self.num_samples):
            # read the pool at every draw: a refresh between two batches changes the next one
            pick = torch.multinomial(self.probs, 1, generator=self._draws)
            yield int(self.pool[pick])

    def __len__(self) -> int:
        return self.num_samples


def sampling_probabilities(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(scores / τ) in float64; uniform for τ = ∞."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if math.isinf(temperature):
        return torch.full_like(scores, 1.0 / scores.numel())
    return torch.softmax(scores / temperature, dim=0)


def effective_fraction(probs: torch.Tensor) -> float:
    """Kish's effective sample size 1/Σp², as a fraction of the number of rows (1 for uniform)."""
    return float(1.0 / probs.pow(2).sum() / probs.numel())


def temperature_for_ess(scores: torch.Tensor, fraction: float, iterations: int = 60) -> float:
    """The τ at which softmax(scores/τ) has an effective sample size of ``fraction`` of the rows.

    The effective size grows with τ from the count of tied maxima (τ → 0) to all rows (τ → ∞),
    so a bisection on log τ finds it; ∞ when the scores are constant or ``fraction`` is 1.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    spread = float(scores.max() - scores.min())
    if fraction >= 1 or spread <= 1e-12 * max(1.0, float(scores.abs().max())):
        return math.inf
    lo, hi = math.log(spread) - 12.0, math.log(spread) + 12.0  # ESS at e^lo ≈ ties only, at e^hi ≈ all rows
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if effective_fraction(torch.softmax(scores / math.exp(mid), dim=0)) < fraction:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)
