"""Fusion, SRA / PRA / uniform allocation, the result type and Kendall τ (docs/method.md §4, §5).

Expected numbers are worked out by hand in the comments, not by calling the code under test."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sensitivity_lora.scoring.allocate import allocate
from sensitivity_lora.scoring.fusion import fuse
from sensitivity_lora.scoring.metrics import ModuleMetrics
from sensitivity_lora.scoring.result import Allocation, ModuleAllocation, kendall_tau
from sensitivity_lora.scoring.rules import allocate_pra, allocate_sra, allocate_uniform, water_fill

SQ2, SQ6 = math.sqrt(2.0), math.sqrt(6.0)


# ---------------------------------------------------------------- fusion

# Three modules: trace [1, 2, 3], top-k mean constant 2 (σ = 0), effective rank [1, 1, 4].
TRACE, TOPK, EFF = [1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [1.0, 1.0, 4.0]


def test_sigma_mu2_fusion_hand_example():
    # S_g: μ = 2, σ² = (1 + 0 + 1)/3 = 2/3 → w_g = √(2/3)/4 = √6/12.
    # S_t: σ = 0 → contributes nothing.
    # S_e: μ = 2, σ² = (1 + 1 + 4)/3 = 2 → w_e = √2/4; S_l = [√2/4, √2/4, √2].
    # S_l: μ = √2/2, deviations −√2/4, −√2/4, √2/2 → σ² = (1/8 + 1/8 + 1/2)/3 = 1/4, σ = 1/2; w_l = (1/2)/(1/2) = 1.
    # θ = √6/12·[1, 2, 3] + [√2/4, √2/4, √2].
    expected = [SQ6 / 12 + SQ2 / 4, SQ6 / 6 + SQ2 / 4, SQ6 / 4 + SQ2]
    np.testing.assert_allclose(fuse(TRACE, TOPK, EFF), expected, rtol=1e-14)


def test_fusion_ablations_hand_example():
    np.testing.assert_allclose(fuse(TRACE, TOPK, EFF, "global"), [1.0, 2.0, 3.0])
    np.testing.assert_allclose(fuse(TRACE, TOPK, EFF, "local"), [SQ2 / 4, SQ2 / 4, SQ2], rtol=1e-14)
    # equal: S_l = 0.5/2·S_t + 0.5/2·S_e = [0.5 + 0.25, 0.5 + 0.25, 0.5 + 1] = [0.75, 0.75, 1.5], μ(S_l) = 1;
    # θ = 0.5/2·[1, 2, 3] + 0.5/1·S_l = [0.25 + 0.375, 0.5 + 0.375, 0.75 + 0.75] = [0.625, 0.875, 1.5].
    np.testing.assert_allclose(fuse(TRACE, TOPK, EFF, "equal"), [0.625, 0.875, 1.5], rtol=1e-14)


@pytest.mark.parametrize("fusion", ["sigma_mu2", "global", "local", "equal"])
def test_fusion_is_scale_free(fusion):
    rng = np.random.default_rng(0)
    trace, topk, eff = rng.lognormal(size=(3, 17)) * [[1e4], [10.0], [100.0]]
    base = fuse(trace, topk, np.round(eff), fusion)
    for scales in ([7.0, 1.0, 1.0], [1.0, 1e-3, 1.0], [1.0, 1.0, 3.0], [2.5, 1e6, 0.25]):
        scaled = fuse(trace * scales[0], topk * scales[1], np.round(eff) * scales[2], fusion)
        np.testing.assert_allclose(scaled / scaled.sum(), base / base.sum(), rtol=1e-12)


def test_degenerate_metrics_contribute_nothing():
    rng = np.random.default_rng(1)
    trace, topk, eff = rng.random((3, 9)) + 0.1
    const = np.full(9, 5.0)
    # Constant trace: σ(S_g) = 0, so θ is w_l·S_l, i.e. proportional to the local-only θ.
    theta = fuse(const, topk, eff)
    local = fuse(const, topk, eff, "local")
    np.testing.assert_allclose(theta / theta.sum(), local / local.sum(), rtol=1e-13)
    # Constant top-k and effective rank: S_l = 0, θ = w_g·S_g ∝ trace.
    theta = fuse(trace, const, const)
    np.testing.assert_allclose(theta / theta.sum(), trace / trace.sum(), rtol=1e-13)
    # Everything constant (or a single module): θ uniform.
    np.testing.assert_array_equal(fuse(const, const, const), np.ones(9))
    np.testing.assert_array_equal(fuse([3.0], [2.0], [1.0]), [1.0])
    for fusion in ("global", "local", "equal"):
        assert np.all(fuse(const, const, const, fusion) == fuse(const, const, const, fusion)[0])


def test_zero_metrics_guard_mu_zero():
    zeros = np.zeros(4)
    for fusion in ("sigma_mu2", "global", "local", "equal"):
        theta = fuse(zeros, zeros, zeros, fusion)
        np.testing.assert_array_equal(theta, np.ones(4))
    theta = fuse([1.0, 2.0, 3.0, 4.0], zeros, zeros, "equal")  # S_t, S_e all zero: only the trace term
    assert np.isfinite(theta).all()
    np.testing.assert_allclose(theta, 0.5 / 2.5 * np.array([1.0, 2.0, 3.0, 4.0]))


@pytest.mark.parametrize("args, message", [
    (([1.0], [1.0, 2.0], [1.0]), "same length"),
    (([], [], []), "non-empty"),
    (([1.0, np.nan], [1.0, 1.0], [1.0, 1.0]), "trace must be finite"),
    (([1.0, 1.0], [1.0, -1.0], [1.0, 1.0]), "topk must be finite and >= 0"),
])
def test_fusion_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        fuse(*args)
    with pytest.raises(ValueError, match="fusion='median' is unknown"):
        fuse([1.0], [1.0], [1.0], "median")


# ---------------------------------------------------------------- SRA

def test_sra_clamping_with_rebalancing():
    # θ = [10, 1, 1, 1, 1], r̄ = 4 → 20 units, r_max = 8: the first share 10/14·20 = 14.3 > 8 is fixed at 8,
    # the remaining 12 go to four equal θ: 3 each.
    np.testing.assert_array_equal(allocate_sra(np.array([10.0, 1, 1, 1, 1]), 4, 1, 8), [8, 3, 3, 3, 3])
    # θ = [12, 6, 1, 1], 16 units, r_min 2, r_max 7. Proportional: 9.6, 4.8, 0.8, 0.8 crosses both bounds.
    # With module 0 at 7 and modules 2, 3 at 2: 7 + 6λ + 2 + 2 = 16 → λ = 5/6, module 1 gets 5 (inside [2, 7]).
    np.testing.assert_array_equal(allocate_sra(np.array([12.0, 6, 1, 1]), 4, 2, 7), [7, 5, 2, 2])


def test_water_filling_fixes_the_larger_crossing_side_first():
    # θ = [10, 1, 1, 1], budget 12, bounds [1, 6]. First share λ = 12/13: [9.23, 0.92, 0.92, 0.92].
    # Fixing every crossing module at once would give 6 + 1 + 1 + 1 = 9 ≠ 12. The excess above 6 (3.23) beats
    # the deficit below 1 (3 × 0.077 = 0.23), so only module 0 is fixed; the other 6 units share evenly: 2 each.
    np.testing.assert_allclose(water_fill(np.array([10.0, 1, 1, 1]), np.ones(4), np.full(4, 6.0), 12.0), [6, 2, 2, 2])
    np.testing.assert_array_equal(allocate_sra(np.array([10.0, 1, 1, 1]), 3, 1, 6), [6, 2, 2, 2])


def _bisect_lambda(theta, lo, hi, budget, cost):
    """Independent oracle: the λ with Σ cost·clip(λθ, lo, hi) = budget, by bisection."""
    a, b = 0.0, 1.0
    while np.dot(cost, np.clip(b * theta, lo, hi)) < budget:
        b *= 2.0
    for _ in range(200):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if np.dot(cost, np.clip(mid * theta, lo, hi)) < budget else (a, mid)
    return np.clip(b * theta, lo, hi)


def test_water_filling_matches_the_clipped_proportional_solution():
    rng = np.random.default_rng(2)
    for _ in range(200):
        n = int(rng.integers(2, 60))
        theta = rng.lognormal(sigma=2.0, size=n) * (rng.random(n) > 0.1)  # ~10% zeros, wide range
        theta[0] = max(theta[0], 0.1)
        lo = rng.integers(1, 4, size=n).astype(float)
        hi = lo + rng.integers(0, 40, size=n)
        cost = rng.integers(1, 50, size=n).astype(float) if rng.random() < 0.5 else np.ones(n)
        floor_cost, cap_cost = cost @ lo, cost @ np.where(theta > 0, hi, lo)
        if cap_cost <= floor_cost:
            continue
        budget = floor_cost + rng.random() * (cap_cost - floor_cost)
        got = water_fill(theta, lo, hi, budget, cost)
        np.testing.assert_allclose(got, _bisect_lambda(theta, lo, hi, budget, cost), rtol=1e-9, atol=1e-9)
        assert cost @ got == pytest.approx(budget, rel=1e-12)


def test_sra_exact_budget_and_bounds_on_random_cases():
    rng = np.random.default_rng(3)
    for _ in range(300):
        n = int(rng.integers(1, 80))
        avg = float(rng.choice([1, 2, 4, 8, 16, 2.5, 7.3]))
        theta = rng.lognormal(sigma=float(rng.choice([0.1, 1.0, 3.0])), size=n)
        size = rng.integers(1, 64, size=n)
        r_max = np.minimum(size, math.floor(4 * avg))
        budget = math.floor(avg * n + 0.5)
        if n > budget or r_max.sum() < budget:
            with pytest.raises(ValueError, match="infeasible budget"):
                allocate_sra(theta, avg, 1, r_max)
            continue
        ranks = allocate_sra(theta, avg, 1, r_max)
        assert ranks.sum() == budget
        assert (ranks >= 1).all() and (ranks <= r_max).all()
        assert ranks.dtype.kind == "i"


def test_sra_largest_remainder_and_ties_by_module_order():
    # θ = [0.5, 0.3, 0.2], 7 units: 3.5, 2.1, 1.4 → floors 3, 2, 1 (6), the last unit to the largest remainder .5.
    np.testing.assert_array_equal(allocate_sra(np.array([0.5, 0.3, 0.2]), 7 / 3, 1, None, budget=7), [4, 2, 1])
    # θ = [1, 1, 1], 4 units: 4/3 each, one unit left, tie → first module.  5 units → first two.
    np.testing.assert_array_equal(allocate_sra(np.ones(3), 4 / 3, 1, None, budget=4), [2, 1, 1])
    np.testing.assert_array_equal(allocate_sra(np.ones(3), 5 / 3, 1, None, budget=5), [2, 2, 1])
    # Remainders equal up to rounding noise (0.1 + 0.2 ≠ 0.3 in binary) still tie: θ ∝ [0.3, 0.1 + 0.2, 0.3].
    np.testing.assert_array_equal(allocate_sra(np.array([0.3, 0.1 + 0.2, 0.3]), 4 / 3, 1, None, budget=4), [2, 1, 1])
    np.testing.assert_array_equal(allocate_sra(np.array([0.1 + 0.2, 0.3, 0.3]), 4 / 3, 1, None, budget=4), [2, 1, 1])


def test_sra_zero_theta_modules_get_r_min():
    # θ = [0, 3, 1], 12 units: module 0 at r_min = 1; 11 units ∝ 3:1 → 8.25, 2.75 → floors 8, 2,
    # the last unit to the larger remainder (.75) → [1, 8, 3].
    np.testing.assert_array_equal(allocate_sra(np.array([0.0, 3.0, 1.0]), 4, 1, None), [1, 8, 3])
    # When the θ > 0 modules are capped, the θ = 0 modules share the rest evenly: [0, 0, 5] with cap 6, 12 units
    # → module 2 at 6, the other 6 units 3 + 3.
    np.testing.assert_array_equal(allocate_sra(np.array([0.0, 0.0, 5.0]), 4, 1, 6), [3, 3, 6])
    # All θ = 0: uniform.
    np.testing.assert_array_equal(allocate_sra(np.zeros(4), 3, 1, None), [3, 3, 3, 3])


def test_rho_infinity_is_pure_proportional_rounding():
    rng = np.random.default_rng(4)
    n, avg = 30, 8
    theta = rng.random(n) + 0.2  # every share ≥ 0.2/1.2·8 > 1, so r_min never binds
    metrics = {f"m{i}": ModuleMetrics(float(t), 1.0, 1.0, 512, 512, "g") for i, t in enumerate(theta)}
    got = allocate(metrics, avg, fusion="global", rho=math.inf).ranks()
    # Oracle: floor θ/Σθ·240, then largest remainders (ties by order) until Σ = 240.
    share = theta / theta.sum() * n * avg
    ranks = np.floor(share).astype(int)
    for i in sorted(range(n), key=lambda i: (-(share[i] - ranks[i]), i))[: n * avg - ranks.sum()]:
        ranks[i] += 1
    assert list(got.values()) == ranks.tolist()
    # One massive-activation module: ρ = ∞ lets it far past 4·r̄ = 32, the default ρ = 4 caps it there.
    theta[0] = 1000.0
    metrics["m0"] = ModuleMetrics(1000.0, 1.0, 1.0, 512, 512, "g")
    assert allocate(metrics, avg, fusion="global", rho=math.inf).ranks()["m0"] > 150
    capped = allocate(metrics, avg, fusion="global")
    assert capped.ranks()["m0"] == 32 and capped.modules["m0"].at_bound == "max"
    assert sum(capped.ranks().values()) == n * avg


def test_sra_infeasible_budgets_name_the_numbers_and_fix():
    with pytest.raises(ValueError, match=r"12 ranks .* less than the 15 ranks that r_min = 5.*lower r_min"):
        allocate_sra(np.ones(3), 4, 5, None)
    with pytest.raises(ValueError, match=r"12 ranks .* more than the 6 ranks the caps .*raise rho"):
        allocate_sra(np.ones(3), 4, 1, 2)
    with pytest.raises(ValueError, match="r_min=3 exceeds r_max=2"):
        allocate_sra(np.ones(3), 4, 3, np.array([4, 2, 4]))
    for bad in (0, -1, math.nan, math.inf):
        with pytest.raises(ValueError, match="avg_rank must be a positive finite number"):
            allocate_sra(np.ones(3), bad, 1, None)
    with pytest.raises(ValueError, match="theta must be finite"):
        allocate_sra(np.array([1.0, -1.0]), 4, 1, None)


def test_params_mode_hand_examples():
    # Two modules, costs d_in + d_out = 32 and 64, r̄ = 4: budget 4·96 = 384 parameters.
    cost = np.array([32, 64])
    # θ = [1, 1]: r = 4, 4 (384).  θ = [2, 1]: λ·(2·32 + 64) = 384 → λ = 3 → [6, 3] (192 + 192 = 384).
    np.testing.assert_array_equal(allocate_sra(np.array([1.0, 1.0]), 4, 1, None, cost=cost), [4, 4])
    np.testing.assert_array_equal(allocate_sra(np.array([2.0, 1.0]), 4, 1, None, cost=cost), [6, 3])
    # θ = [3, 1]: λ·(96 + 64) = 384 → λ = 2.4 → [7.2, 2.4] → floors [7, 2] = 224 + 128 = 352, 32 left.
    # Largest remainder first: module 1 (.4) would cost 64 > 32, skipped; module 0 (.2) costs 32 → [8, 2] = 384.
    np.testing.assert_array_equal(allocate_sra(np.array([3.0, 1.0]), 4, 1, None, cost=cost), [8, 2])


def test_params_mode_never_exceeds_the_budget():
    rng = np.random.default_rng(5)
    for _ in range(300):
        n = int(rng.integers(1, 50))
        avg = float(rng.choice([2, 4, 8, 3.7]))
        d_in, d_out = rng.integers(8, 300, size=(2, n))
        cost = d_in + d_out
        r_max = np.minimum(np.minimum(d_in, d_out), math.floor(4 * avg))
        theta = rng.lognormal(sigma=1.5, size=n)
        budget = math.floor(avg * cost.sum() + 1e-9)
        if cost.sum() > budget or cost @ r_max < budget:
            continue
        ranks = allocate_sra(theta, avg, 1, r_max, cost=cost)
        spent = int(cost @ ranks)
        assert spent <= budget
        assert (ranks >= 1).all() and (ranks <= r_max).all()
        # Greedy closeness: every module that got no extra rank above its real share (water-filling, checked
        # against bisection above) and is below its cap costs more than what is left.
        real = water_fill(theta, np.ones(n), r_max, budget, cost)
        passed_over = (ranks <= np.floor(real + 1e-9)) & (ranks < r_max)
        assert not passed_over.any() or budget - spent < cost[passed_over].min()
    # Uniform θ and integer r̄: exactly r̄ everywhere, the budget met exactly.
    cost = rng.integers(10, 400, size=25)
    np.testing.assert_array_equal(allocate_sra(np.ones(25), 8, 1, 32, cost=cost), np.full(25, 8))


# ---------------------------------------------------------------- PRA and uniform

def test_pra_method_example():
    # docs/method.md §5: 6 matrices, r̄ = 5, C = 3 → tiers get 5 + 1 − c = 6, 5, 4; two modules per tier.
    # θ order: module 1 (.9), 4 (.8) | 2 (.5), 3 (.3) | 5 (.2), 0 (.1).
    theta = np.array([0.1, 0.9, 0.5, 0.3, 0.8, 0.2])
    np.testing.assert_array_equal(allocate_pra(theta, 5, 3), [4, 6, 5, 5, 6, 4])


def test_pra_uneven_tiers_ties_rounding_and_clamps():
    # 7 modules, C = 3: tiers of 3, 2, 2; r̄ = 4 → 5, 4, 3. θ descending in module order.
    np.testing.assert_array_equal(allocate_pra(np.arange(7, 0, -1.0), 4, 3), [5, 5, 5, 4, 4, 3, 3])
    # Ties keep module order (stable sort): all θ equal → the first modules are the "most sensitive".
    np.testing.assert_array_equal(allocate_pra(np.ones(4), 4, 2), [5, 5, 4, 4])  # 4.5 → 5, 3.5 → 4
    # C = 2, r̄ = 8: 8.5 → 9 and 7.5 → 8 (half up).
    np.testing.assert_array_equal(allocate_pra(np.array([1.0, 2.0]), 8, 2), [8, 9])
    # Clamps: r̄ = 1, C = 5 → 3, 2, 1, 0, −1, clamped to [1, 2].
    np.testing.assert_array_equal(allocate_pra(np.arange(5, 0, -1.0), 1, 5, 1, 2), [2, 2, 1, 1, 1])
    # More tiers than modules: empty tiers are skipped, ranks follow the tier index.
    np.testing.assert_array_equal(allocate_pra(np.array([2.0, 1.0]), 4, 5), [6, 5])
    with pytest.raises(ValueError, match="tiers must be an int >= 1"):
        allocate_pra(np.ones(3), 4, 0)


def test_uniform():
    np.testing.assert_array_equal(allocate_uniform(4, 8), [8, 8, 8, 8])
    np.testing.assert_array_equal(allocate_uniform(3, 8, 1, np.array([16, 4, 16])), [8, 4, 8])  # matrix-size cap
    with pytest.raises(ValueError, match="integer avg_rank"):
        allocate_uniform(4, 7.5)


# ---------------------------------------------------------------- allocate() and the result type

def _metrics(n: int = 6, seed: int = 0) -> dict[str, ModuleMetrics]:
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(n // 3):
        for kind, (d_in, d_out) in (("q_proj", (64, 64)), ("k_proj", (64, 16)), ("down_proj", (128, 64))):
            out[f"model.layers.{layer}.{kind}"] = ModuleMetrics(
                trace=float(rng.lognormal(3)), topk=float(rng.lognormal()), eff_rank=float(rng.integers(1, 500)),
                d_in=d_in, d_out=d_out, group=f"layers.{layer}.{'mlp' if kind == 'down_proj' else 'attn'}")
    return out


def test_allocate_records_everything_and_keeps_model_order():
    metrics = _metrics(9)
    alloc = allocate(metrics, 8, extra_settings={"n_tokens": 100})
    assert list(alloc.modules) == list(metrics)
    assert alloc.method == "sra" and alloc.budget == 72 == alloc.total_rank() and alloc.budget_mode == "rank"
    assert alloc.settings == {"hessian": "diag", "scope": "matrix", "topk": 0.5, "energy": 0.85,
                              "fusion": "sigma_mu2", "r_min": 1, "rho": 4.0, "r_max": None, "tiers": 3,
                              "init": "none", "init_rho": 2.0, "init_scale": "unit", "n_tokens": 100}
    for name, m in alloc.modules.items():
        assert (m.trace, m.topk, m.eff_rank, m.d_in, m.d_out, m.group) == (
            metrics[name].trace, metrics[name].topk, metrics[name].eff_rank, metrics[name].d_in,
            metrics[name].d_out, metrics[name].group)
        cap = min(m.d_in, m.d_out, 32)
        assert 1 <= m.rank <= cap
        assert m.at_bound == ("max" if m.rank == cap else "min" if m.rank == 1 else None)
    assert alloc.trainable_params() == sum(m.rank * (m.d_in + m.d_out) for m in alloc.modules.values())


def test_allocate_caps_from_rho_and_explicit_r_max():
    # One module with a θ far above the rest; 3 modules of 64×64, r̄ = 4, 12 units.
    metrics = {n: ModuleMetrics(t, 1.0, 1.0, 64, 64, "g") for n, t in (("a", 100.0), ("b", 1.0), ("c", 1.0))}
    # ρ = 2 → cap 8: a = 8, b = c = 2.   ρ = 1.5 → floor(6) = 6: a = 6, 3, 3.   r_max = 10 overrides ρ: 10, 1, 1.
    assert allocate(metrics, 4, fusion="global", rho=2).ranks() == {"a": 8, "b": 2, "c": 2}
    assert allocate(metrics, 4, fusion="global", rho=1.5).ranks() == {"a": 6, "b": 3, "c": 3}
    assert allocate(metrics, 4, fusion="global", rho=2, r_max=10).ranks() == {"a": 10, "b": 1, "c": 1}
    # The matrix size caps too: a 64×4 module takes at most 4.
    small = dict(metrics, a=ModuleMetrics(100.0, 1.0, 1.0, 64, 4, "g"))
    assert allocate(small, 4, fusion="global", rho=math.inf).ranks() == {"a": 4, "b": 4, "c": 4}


def test_allocate_methods_and_params_mode():
    metrics = _metrics(6)
    pra = allocate(metrics, 4, method="pra")
    assert sorted(pra.ranks().values()) == [3, 3, 4, 4, 5, 5]
    assert allocate(metrics, 4, method="uniform").ranks() == dict.fromkeys(metrics, 4)
    params = allocate(metrics, 4, budget_mode="params")
    assert params.budget == 4 * sum(m.d_in + m.d_out for m in metrics.values())
    assert params.trainable_params() <= params.budget
    # The three metrics in θ are the same, so the θ order agrees across methods.
    assert kendall_tau(pra, params) == pytest.approx(1.0)


def test_allocate_rounds_a_fractional_budget_and_records_it():
    alloc = allocate(_metrics(3), 2.5)  # 2.5 × 3 = 7.5 → 8 (half up)
    assert alloc.budget == 8 == alloc.total_rank()
    assert alloc.settings["budget_rounded_from"] == 7.5


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "adalora"}, "method='adalora' is unknown"),
    ({"fusion": "max"}, "fusion='max' is unknown"),
    ({"budget_mode": "flops"}, "budget_mode='flops' is unknown"),
    ({"method": "pra", "budget_mode": "params"}, "applies to method 'sra' only"),
    ({"r_min": 0}, "r_min must be an int >= 1"),
    ({"rho": 0}, "rho must be a positive number"),
    ({"r_max": 0}, "r_max must be an int >= 1"),
    ({"extra_settings": {"fusion": "x"}}, "may not override 'fusion'"),
    ({"extra_settings": {"method": "x"}}, "may not override 'method'"),
    ({"avg_rank": 0}, "avg_rank must be a positive"),
    ({"r_min": 9}, "infeasible budget"),
])
def test_allocate_bad_input(kwargs, message):
    kwargs = {"avg_rank": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        allocate(_metrics(6), **kwargs)


def test_allocate_needs_modules():
    with pytest.raises(ValueError, match="no module metrics"):
        allocate({}, 4)


def test_json_round_trip_is_exact_and_plain(tmp_path):
    alloc = allocate(_metrics(9, seed=4), 8, rho=math.inf, extra_settings={"targets": ("q_proj", "k_proj")})
    path = tmp_path / "allocation.json"
    alloc.save(path)
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text  # standard JSON only
    data = json.loads(text)
    for key in ("method", "avg_rank", "budget", "budget_mode", "settings", "concentration", "modules"):
        assert key in data
    assert data["settings"]["rho"] == "inf"
    first = data["modules"]["model.layers.0.q_proj"]
    assert {"rank", "theta", "trace", "topk", "eff_rank", "d_in", "d_out", "group"} <= set(first)
    loaded = Allocation.load(path)
    assert loaded == alloc
    assert Allocation.from_dict(alloc.to_dict()) == alloc
    assert list(loaded.modules) == list(alloc.modules)
    with pytest.raises(ValueError, match="not an allocation"):
        Allocation.from_dict({"method": "sra"})


def _hand_allocation(ranks: list[int], bounds: list[str | None]) -> Allocation:
    modules = {f"m{i}": ModuleAllocation(rank=r, theta=float(r), trace=1.0, topk=1.0, eff_rank=1.0, d_in=10, d_out=6,
                                         group="g", at_bound=b) for i, (r, b) in enumerate(zip(ranks, bounds))}
    return Allocation("sra", 4.0, sum(ranks), "rank", {}, modules)


def test_concentration_hand_example():
    # 20 modules: top 5% = 1 module. Ranks: one 20 (at r_max), five 1 (at r_min), fourteen 3.
    # Σ = 20 + 5 + 42 = 67; the top module holds 20/67.
    alloc = _hand_allocation([3] * 7 + [20] + [1] * 5 + [3] * 7, [None] * 7 + ["max"] + ["min"] * 5 + [None] * 7)
    conc = alloc.concentration()
    assert conc["top_modules"] == 1 and conc["top5_share"] == pytest.approx(20 / 67)
    assert (conc["at_min"], conc["at_max"]) == (5, 1)
    # 50 modules → floor(2.5) = 2 top modules: ranks 9 and 7 of Σ 9 + 7 + 48·2 = 112 → 16/112.
    alloc = _hand_allocation([2] * 20 + [9, 7] + [2] * 28, [None] * 50)
    assert alloc.concentration()["top_modules"] == 2
    assert alloc.concentration()["top5_share"] == pytest.approx(16 / 112)
    # 3 modules: still at least one.
    assert _hand_allocation([1, 2, 5], [None] * 3).concentration()["top5_share"] == pytest.approx(5 / 8)
    # Σ r·(d_in + d_out) = 8 · 16.
    assert _hand_allocation([1, 2, 5], [None] * 3).trainable_params() == 128


# ---------------------------------------------------------------- Kendall τ

def _with_theta(thetas: list[float], names: list[str] | None = None) -> Allocation:
    names = names or [f"m{i}" for i in range(len(thetas))]
    modules = {n: ModuleAllocation(rank=1, theta=t, trace=1.0, topk=1.0, eff_rank=1.0, d_in=4, d_out=4, group="g")
               for n, t in zip(names, thetas)}
    return Allocation("sra", 1.0, len(thetas), "rank", {}, modules)


def test_kendall_tau_hand_cases():
    a = _with_theta([1.0, 2.0, 3.0, 4.0])
    assert kendall_tau(a, _with_theta([10.0, 20.0, 30.0, 40.0])) == pytest.approx(1.0)
    assert kendall_tau(a, _with_theta([4.0, 3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    # x = [1, 2, 3, 4], y = [1, 2, 2, 3]: of the 6 pairs, 5 concordant, 0 discordant, 1 tied in y only.
    # τ-b = (5 − 0)/√((6 − 0)(6 − 1)) = 5/√30.
    assert kendall_tau(a, _with_theta([1.0, 2.0, 2.0, 3.0])) == pytest.approx(5 / math.sqrt(30))
    # One swapped pair among 4: 5 concordant, 1 discordant → (5 − 1)/6 = 2/3.
    assert kendall_tau(a, _with_theta([1.0, 2.0, 4.0, 3.0])) == pytest.approx(2 / 3)


def test_kendall_tau_uses_common_modules_only():
    a = _with_theta([1.0, 2.0, 3.0, 9.0], ["x", "y", "z", "only_a"])
    b = _with_theta([0.0, 3.0, 2.0, 1.0], ["only_b", "z", "y", "x"])
    # Common x, y, z: a gives 1, 2, 3 and b gives 1, 2, 3 → τ = 1.
    assert kendall_tau(a, b) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="share 1 module"):
        kendall_tau(a, _with_theta([1.0, 2.0], ["x", "w"]))
