"""TsqLoRA's sampler: frequencies follow softmax(Q/τ) (chi-square), τ = ∞ is uniform, seeds reproduce."""
from __future__ import annotations

import math

import pytest
import torch

from sensitivity_lora.training.sampler import (QualitySampler, effective_fraction, sampling_probabilities,
                                               temperature_for_ess)

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
    # the expected frequencies written out by hand, not through the sampler's own function
    weights = [1.0 if math.isinf(temperature) else math.exp(float(q) / temperature) for q in scores]
    probs = torch.tensor([w / sum(weights) for w in weights], dtype=torch.float64)
    assert chi_square(counts, probs) < CHI2_9_999
    torch.testing.assert_close(sampling_probabilities(scores, temperature), probs)


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


def test_effective_fraction_by_hand():
    assert effective_fraction(torch.full((4,), 0.25, dtype=torch.float64)) == pytest.approx(1.0)
    # p = (1/2, 1/2, 0, 0): 1/Σp² = 2 of 4 rows
    assert effective_fraction(torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)) == pytest.approx(0.5)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("spread", [0.5, 3.0, 20.0])
def test_auto_temperature_hits_the_effective_sample_size(fraction, spread):
    scores = torch.randn(64, generator=torch.Generator().manual_seed(int(spread * 10))) * spread
    tau = temperature_for_ess(scores, fraction)
    assert math.isfinite(tau) and tau > 0
    assert effective_fraction(sampling_probabilities(scores, tau)) == pytest.approx(fraction, rel=1e-6)
    # the effective size grows with τ: a colder τ gives fewer effective rows, a hotter one more
    assert effective_fraction(sampling_probabilities(scores, tau / 2)) < fraction
    assert effective_fraction(sampling_probabilities(scores, tau * 2)) > fraction


def test_auto_temperature_in_the_sampler():
    pool_scores = torch.tensor([0.0, 0.0, 1.0, 4.0], dtype=torch.float64)
    sampler = QualitySampler(10, temperature="auto", pool_size=4, seed=0, ess_fraction=0.5)
    sampler.set_scores([1, 3, 5, 7], pool_scores)
    assert effective_fraction(sampler.probs) == pytest.approx(0.5, rel=1e-6)
    assert sampler.probs[3] > sampler.probs[2] > sampler.probs[0] == sampler.probs[1]
    sampler.set_scores([1, 3, 5, 7], torch.zeros(4))  # constant scores: uniform, τ = ∞
    assert sampler.last_temperature == math.inf and torch.allclose(sampler.probs, torch.full((4,), 0.25, dtype=torch.float64))
    assert temperature_for_ess(pool_scores, 1.0) == math.inf


def test_auto_temperature_two_rows_by_hand():
    # scores (0, s): p = e^{s/τ}/(1 + e^{s/τ}) for the second row; 1/Σp² = 2·0.8 = 1.6 ⇔
    # p² + (1 − p)² = 1/1.6 ⇒ p = (1 + √(2/1.6 − 1)) / 2 = 0.75 ⇒ e^{s/τ} = 3 ⇒ τ = s / ln 3
    s = 2.0
    assert temperature_for_ess(torch.tensor([0.0, s]), 0.8) == pytest.approx(s / math.log(3), rel=1e-9)


@pytest.mark.parametrize("kwargs", [{"n_examples": 0}, {"n_examples": 5, "temperature": 0.0},
                                    {"n_examples": 5, "pool_size": 0}, {"n_examples": 5, "temperature": "hot"},
                                    {"n_examples": 5, "ess_fraction": 0.0}, {"n_examples": 5, "ess_fraction": 1.5},
                                    {"n_examples": 5, "num_samples": -1}])
def test_sampler_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        QualitySampler(**kwargs)
    sampler = QualitySampler(5)
    with pytest.raises(ValueError, match="one score per index"):
        sampler.set_scores([0, 1], torch.tensor([1.0]))
    with pytest.raises(ValueError, match="finite"):
        sampler.set_scores([0], torch.tensor([math.nan]))


def test_pools_come_in_random_order_so_scoring_chunks_mix_a_sorted_data_set():
    whole = QualitySampler(160, pool_size=None, seed=0)
    assert sorted(whole.pool.tolist()) == list(range(160)) and whole.pool.tolist() != list(range(160))
    part = QualitySampler(160, pool_size=64, seed=0)
    pool = part.pool.tolist()
    assert len(set(pool)) == 64 and pool != sorted(pool)
    # a set stored by class (32 rows each): every scoring chunk of 16 holds rows of more than one class
    assert all(len({i // 32 for i in pool[k:k + 16]}) > 1 for k in range(0, 64, 16))
    assert QualitySampler(160, pool_size=64, seed=0).pool.tolist() == pool  # reproducible
