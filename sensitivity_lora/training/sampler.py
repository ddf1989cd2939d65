"""TsqLoRA's sampler: training rows drawn with probability softmax(Q/τ) over the latest scored pool.

Draws are stochastic and with replacement (the paper's p(x) = softmax(Q/τ), not a top-k cut),
one at a time as the DataLoader asks for them, so a refresh takes effect on the next batch
the loader builds. τ = ∞ is uniform over the pool; pools are drawn uniformly from the whole
training set, so over many refreshes every row is equally likely to be a candidate. Two seeded
generators (pools, draws) make a run reproducible.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from .checks import check_positive_int, check_positive_number


class QualitySampler(Sampler[int]):
    """Indices into a dataset of ``n_examples`` rows, drawn from softmax(Q/τ) over the current pool.

    ``pool_size`` None is the whole dataset. Before any scores are set the pool is sampled
    uniformly. ``num_samples`` (default ``n_examples``) is the length of one epoch.
    """

    def __init__(self, n_examples: int, temperature: float = 1.0, pool_size: int | None = None, seed: int = 0,
                 num_samples: int | None = None) -> None:
        check_positive_int("n_examples (the training rows)", n_examples)
        check_positive_number("temperature", temperature, allow_inf=True)
        check_positive_int("pool_size", pool_size, allow_none=True)
        self.n_examples = n_examples
        self.temperature = float(temperature)
        self.pool_size = min(pool_size or n_examples, n_examples)
        self.num_samples = n_examples if num_samples is None else int(num_samples)
        self._pools = torch.Generator().manual_seed(seed)
        self._draws = torch.Generator().manual_seed(seed + 1)
        self.pool: torch.Tensor = torch.arange(n_examples)
        self.probs: torch.Tensor = torch.full((n_examples,), 1.0 / n_examples, dtype=torch.float64)
        self.new_pool()

    def new_pool(self) -> list[int]:
        """Draw the next candidate pool (uniform, without replacement; sorted), sampled uniformly until scored."""
        if self.pool_size == self.n_examples:
            pool = torch.arange(self.n_examples)
        else:
            pool = torch.randperm(self.n_examples, generator=self._pools)[: self.pool_size].sort().values
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
        self.probs = sampling_probabilities(scores, self.temperature)

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
