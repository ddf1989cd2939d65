"""The rank rules (docs/method.md §5): SRA (water-filling + largest remainder), PRA tiers, uniform, budgets.

Deterministic numpy on a few hundred numbers; ties are broken by module order.
"""
from __future__ import annotations

import math
from fractions import Fraction
from numbers import Integral

import numpy as np

from ..settings import check_avg_rank

# Fractional parts are compared after rounding to this many decimals, so values
# meant to be equal but differing in the last bits tie and fall back to module order.
_TIE_DECIMALS = 9


def water_fill(theta: np.ndarray, lo: np.ndarray, hi: np.ndarray, budget: float,
               cost: np.ndarray | None = None) -> np.ndarray:
    """Real r with lo ≤ r ≤ hi, Σ cost·r = budget and r ∝ θ among the modules inside their bounds.

    This is r = clip(λ·θ, lo, hi) for the λ that spends the budget. Each round
    shares what is left in proportion to θ among the free modules; of the
    modules that cross a bound it fixes those on the side with the larger
    total crossing (they are at that bound in the final solution too, as the
    spent amount is monotone in λ), or both sides when the two are equal.
    Modules with θ = 0 sit at ``lo`` unless the θ > 0 modules cannot absorb
    the budget, in which case they share the rest evenly. Assumes
    Σ cost·lo ≤ budget ≤ Σ cost·hi (checked by the callers).
    """
    theta = np.asarray(theta, dtype=np.float64)
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    cost = np.ones_like(theta) if cost is None else np.asarray(cost, dtype=np.float64)
    r = np.empty_like(theta)
    free = np.ones(theta.size, dtype=bool)
    while free.any():
        left = budget - float(np.dot(cost[~free], r[~free]))
        weight = float(np.dot(cost[free], theta[free]))
        if weight <= 0.0:  # only θ = 0 modules remain: share evenly
            r[free] = water_fill(np.ones(int(free.sum())), lo[free], hi[free], left, cost[free])
            break
        x = left / weight * theta[free]
        over, under = x > hi[free], x < lo[free]
        if not over.any() and not under.any():
            r[free] = x
            break
        excess = float(np.dot(cost[free][over], x[over] - hi[free][over]))
        deficit = float(np.dot(cost[free][under], lo[free][under] - x[under]))
        idx = np.flatnonzero(free)
        if excess >= deficit and over.any():
            r[idx[over]] = hi[idx[over]]
            free[idx[over]] = False
        if deficit >= excess and under.any():
            r[idx[under]] = lo[idx[under]]
            free[idx[under]] = False
    return r


def _rounding_order(real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Floors of ``real`` (snapped to integers within 1e-9) and module indices by largest remainder, ties by order."""
    snapped = np.where(np.abs(real - np.round(real)) <= 1e-9 * np.maximum(1.0, np.abs(real)), np.round(real), real)
    floors = np.floor(snapped)
    frac = np.round(snapped - floors, _TIE_DECIMALS)
    return floors.astype(np.int64), np.argsort(-frac, kind="stable")


def _as_bounds(r_min: int | np.ndarray, r_max: np.ndarray | int | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    lo = np.broadcast_to(np.asarray(r_min, dtype=np.int64), (n,)).copy()
    if r_max is None:  # no cap
        hi = np.full(n, np.iinfo(np.int32).max, dtype=np.int64)
    else:
        hi = np.broadcast_to(np.asarray(r_max, dtype=np.int64), (n,)).copy()
    if (lo < 1).any():
        raise ValueError(f"r_min must be >= 1 (a LoRA rank), got {int(lo.min())}")
    bad = np.flatnonzero(lo > hi)
    if bad.size:
        raise ValueError(f"r_min={int(lo[bad[0]])} exceeds r_max={int(hi[bad[0]])} for module #{int(bad[0])} "
                         "(r_max is capped by min(d_in, d_out)); lower r_min or raise rho / r_max")
    return lo, hi


def _check_theta(theta: np.ndarray) -> np.ndarray:
    theta = np.asarray(theta, dtype=np.float64)
    if theta.ndim != 1 or theta.size == 0:
        raise ValueError(f"theta must be a non-empty 1-D array, got shape {theta.shape}")
    if not np.isfinite(theta).all() or (theta < 0).any():
        raise ValueError("theta must be finite and >= 0 for every module")
    return theta if (theta > 0).any() else np.ones_like(theta)  # no signal at all: uniform


def _exact(value: float) -> Fraction:
    """The decimal the user wrote (7.3, not 7.29999…), for exact budget arithmetic."""
    return Fraction(str(float(value))) if not isinstance(value, Integral) else Fraction(int(value))


def rank_budget(avg_rank: float, n_modules: int) -> int:
    """r_total = avg_rank · M rounded half up (exact when avg_rank · M is an integer)."""
    return math.floor(_exact(avg_rank) * n_modules + Fraction(1, 2))


def param_budget(avg_rank: float, cost: np.ndarray) -> int:
    """The parameter budget avg_rank · Σ(d_in + d_out), rounded down so that it is never exceeded."""
    return math.floor(_exact(avg_rank) * int(np.asarray(cost, dtype=np.int64).sum()))


def allocate_sra(theta: np.ndarray, avg_rank: float, r_min: int | np.ndarray = 1, r_max: np.ndarray | int | None = None,
                 cost: np.ndarray | None = None, budget: int | None = None) -> np.ndarray:
    """SRA ranks: r ∝ θ within [r_min, r_max], integer, on budget (docs/method.md §5).

    Rank mode (``cost`` None): the budget is ``budget`` or round(avg_rank · M)
    rank units; the real water-filling solution is floored and the remaining
    units go one each to the largest fractional parts (ties by module order),
    never past r_max, so Σ r equals the budget exactly.

    Parameter mode (``cost`` = d_in + d_out per module): the budget is
    ``budget`` or floor(avg_rank · Σ cost) parameters. The real solution keeps
    r ∝ θ (so uniform θ gives avg_rank everywhere) with Σ cost·r = budget; it is
    floored, then modules are visited once by largest fractional part (ties by
    module order) and each gets one more rank if it stays ≤ r_max and the total
    Σ cost·r stays within the budget. The result never exceeds the budget;
    it falls short by less than the cost of any module that got no extra rank
    and is below its r_max.

    Raises ValueError when the bounds make the budget infeasible.
    """
    check_avg_rank(avg_rank)
    theta = _check_theta(theta)
    n = theta.size
    lo, hi = _as_bounds(r_min, r_max, n)
    if cost is None:
        unit = "ranks"
        budget = rank_budget(avg_rank, n) if budget is None else int(budget)
        weights = np.ones(n, dtype=np.int64)
    else:
        unit = "parameters"
        weights = np.asarray(cost, dtype=np.int64)
        if weights.shape != (n,) or (weights < 1).any():
            raise ValueError(f"cost must hold one positive integer per module ({n}), got shape {weights.shape}")
        budget = param_budget(avg_rank, weights) if budget is None else int(budget)
    floor_cost = sum(int(w) * int(r) for w, r in zip(weights, lo))  # Python ints: no overflow
    cap_cost = sum(int(w) * int(r) for w, r in zip(weights, hi))
    if floor_cost > budget:
        raise ValueError(f"infeasible budget: {budget} {unit} (avg_rank {avg_rank} over {n} modules) is less than the "
                         f"{floor_cost} {unit} that r_min = {int(lo.min())} needs for every module; lower r_min or raise avg_rank")
    if cap_cost < budget:
        raise ValueError(f"infeasible budget: {budget} {unit} (avg_rank {avg_rank} over {n} modules) is more than the "
                         f"{cap_cost} {unit} the caps r_max = min(d_in, d_out, rho·avg_rank) allow; raise rho (or r_max) "
                         "or lower avg_rank")
    real = np.clip(water_fill(theta, lo, hi, float(budget), None if cost is None else weights), lo, hi)
    return _round_to_budget(real, lo, hi, weights, budget, exact=cost is None)


def _round_to_budget(real: np.ndarray, lo: np.ndarray, hi: np.ndarray, weights: np.ndarray, budget: int,
                     exact: bool) -> np.ndarray:
    """Integer ranks from the real solution: floors, then one extra rank each by largest remainder
    (ties by module order) while Σ weights·r stays within the budget and r within r_max.
    ``exact`` (rank mode) keeps handing out units until Σ r equals the budget."""
    ranks, order = _rounding_order(real)
    spent = int(np.dot(weights, ranks))
    for i in reversed(order):  # only reachable through rounding noise at the snap: take back the excess
        if spent <= budget:
            break
        if ranks[i] > lo[i]:
            ranks[i] -= 1
            spent -= int(weights[i])
    # One pass (each module at most one extra rank) is the rule; rank mode repeats only if
    # rounding noise left units over, and the feasibility check guarantees they fit under r_max.
    for _ in range(max(0, budget - spent) if exact else 1):
        for i in order:
            if ranks[i] < hi[i] and spent + weights[i] <= budget:
                ranks[i] += 1
                spent += int(weights[i])
        if spent == budget:
            break
    return ranks


def allocate_pra(theta: np.ndarray, avg_rank: float, tiers: int = 3, r_min: int | np.ndarray = 1,
                 r_max: np.ndarray | int | None = None) -> np.ndarray:
    """PRA ranks: θ descending (stable), C tiers as equal as possible (earlier tiers take the extra
    module), tier c (0-based) gets round_half_up(avg_rank + (C−1)/2 − c), clamped to [r_min, r_max].

    Example (docs/method.md §5): 6 matrices, avg_rank 5, C = 3 → 6, 6, 5, 5, 4, 4.
    """
    check_avg_rank(avg_rank)
    if isinstance(tiers, bool) or not isinstance(tiers, Integral) or tiers < 1:
        raise ValueError(f"tiers must be an int >= 1, got {tiers!r}")
    theta = _check_theta(theta)
    n = theta.size
    lo, hi = _as_bounds(r_min, r_max, n)
    order = np.argsort(-theta, kind="stable")
    ranks = np.empty(n, dtype=np.int64)
    for c, members in enumerate(np.array_split(order, int(tiers))):
        ranks[members] = math.floor(_exact(avg_rank) + Fraction(int(tiers) - 1, 2) - c + Fraction(1, 2))
    return np.clip(ranks, lo, hi)


def allocate_uniform(n_modules: int, avg_rank: float, r_min: int | np.ndarray = 1,
                     r_max: np.ndarray | int | None = None) -> np.ndarray:
    """avg_rank everywhere (plain LoRA), clamped to [r_min, r_max]; avg_rank must be an integer."""
    check_avg_rank(avg_rank)
    if float(avg_rank) != int(avg_rank):
        raise ValueError(f"method 'uniform' needs an integer avg_rank, got {avg_rank}; round it or use method 'sra'")
    lo, hi = _as_bounds(r_min, r_max, n_modules)
    return np.clip(np.full(n_modules, int(avg_rank), dtype=np.int64), lo, hi)
