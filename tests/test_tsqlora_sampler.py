"""TsqLoRA's sampler: frequencies follow softmax(Q/τ) (chi-square), τ = ∞ is uniform, seeds reproduce."""
from __future__ import annotations

import math

import pytest
import torch

from sensitivity_lora.training.sampler import QualitySampler, sampling_probabilities

# the 0.999 quantile of chi-square with 9 degrees of freedom: a correct sampler fails one run in a thousand
CHI2_9_999 = 27.877


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0, math.inf])
def test_empirical_frequencies_match_softmax_q_over_tau(temperature):
    n, draws = 10, 20000
    sampler = QualitySampler(100, temperature=temperature, pool_size=n, seed=3, num_samples=draws)
    pool = sampler.new_pool()
    scores = torch.linspace(-1.5, 1.5, n)
    sampler.set_scores(pool, scores)
    drawn = torch.tensor(list(sampler))
    assert set(drawn.tolist()) <= set(pool)
    counts = torch.tensor([(drawn == i).sum() for i in pool], dtype=torch.float64)
    probs = sampling_probabilities(scores, temperature)
    assert chi_square(counts, probs) < CHI2_9_999
    if math.isinf(temperature):
        torch.testing.assert_close(probs, torch.full((n,), 0.1, dtype=torch.float64))


def test_the_sampler_is_reproducible_and_refreshes_take_effect_at_once():
    def run(seed):
        s = QualitySampler(50, temperature=0.1, pool_size=8, seed=seed, num_samples=30)
        it = iter(s)
        first = [next(it) for _ in range(10)]
        pool = s.new_pool()
        s.set_scores(pool, torch.tensor([0.0] * 7 + [10.0]))  # all but certain: the last candidate
        return first, [next(it) for _ in range(20)], pool

    a, b = run(1), run(1)
    assert a == b and run(2) != a
    first, after, pool = a
    assert after == [pool[-1]] * 20
    assert len(QualitySampler(7)) == 7 and sorted(QualitySampler(7).new_pool()) == list(range(7))


@pytest.mark.parametrize("kwargs", [{"n_examples": 0}, {"n_examples": 5, "temperature": 0.0},
                                    {"n_examples": 5, "pool_size": 0}])
def test_sampler_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        QualitySampler(**kwargs)
    sampler = QualitySampler(5)
    with pytest.raises(ValueError, match="one score per index"):
        sampler.set_scores([0, 1], torch.tensor([1.0]))
    with pytest.raises(ValueError, match="finite"):
        sampler.set_scores([0], torch.tensor([math.nan]))
