"""The global greedy rank rule: the budget's largest scores over all modules, each module up to its cap.

Every module m brings its scores in descending order, already cut to its cap (EVA: the first
round(ρ·r_m) explained-variance ratios). The ranks are how many of the ``budget`` largest scores
of all modules together each module holds. Because each module's list is descending, this is the
same as handing out ranks one at a time to the module whose next direction scores highest.

Ties (equal scores, e.g. the members of one input group, which share a spectrum) go to the module
earlier in ``order`` (model order), then to the earlier direction; PEFT's EVA sorts with an
unstable ``argsort`` and then only guarantees that a group's first member holds the most, which
this rule satisfies.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def check_whole_rank_budget(avg_rank: int, rho: float) -> None:
    """The settings of a whole-rank greedy (EVA-style): r̄ a positive integer, the cap round(ρ·r̄) with ρ ≥ 1."""
    if isinstance(avg_rank, bool) or not isinstance(avg_rank, int) or avg_rank < 1:
        raise ValueError(f"avg_rank must be a positive integer, got {avg_rank!r}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 1.0:
        raise ValueError(f"rho must be a number >= 1.0 (the cap is round(rho * avg_rank)), got {rho!r}")


def check_whole_rank_budget_fits(dims: Sequence[tuple[int, int]], avg_rank: int, rho: float) -> None:
    """Refuse, from the modules' shapes (d_in, d_out) alone, a budget r̄ · M that the greedy's caps
    min(round(ρ · r̄), d_in, d_out) cannot hold (so a caller can refuse it before any pass)."""
    cap = round(rho * avg_rank)
    room = sum(min(cap, d_in, d_out) for d_in, d_out in dims)
    if room < avg_rank * len(dims):
        raise ValueError(f"avg_rank={avg_rank} asks for {avg_rank * len(dims)} ranks over {len(dims)} modules, but "
                         f"their caps min(round(rho · avg_rank), d_in, d_out) hold only {room}: lower avg_rank or "
                         "raise rho")


def greedy_ranks(scores: Mapping[str, torch.Tensor], budget: int, order: Sequence[str]) -> dict[str, int]:
    """{module: how many of the ``budget`` globally largest scores it holds}, for every module in ``order``."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"the rank budget must be a non-negative integer, got {budget!r}")
    missing = [m for m in order if m not in scores]
    if missing:
        raise ValueError(f"no scores for {len(missing)} modules (e.g. {missing[0]!r})")
    owners, values = [], []
    for index, name in enumerate(order):
        s = scores[name].detach().to(torch.float64).reshape(-1).cpu()
        if s.numel() > 1 and bool((s[1:] > s[:-1]).any()):
            raise ValueError(f"the scores of {name!r} must be in descending order")
        owners.append(torch.full((s.numel(),), index, dtype=torch.long))
        values.append(s)
    counts = dict.fromkeys(order, 0)
    if not values or budget == 0:
        return counts
    flat_owner, flat_value = torch.cat(owners), torch.cat(values)
    # stable sort on the concatenation in module order: ties keep module order, then direction order
    picked = flat_owner[torch.sort(flat_value, descending=True, stable=True).indices[:budget]]
    for index, count in zip(*torch.unique(picked, return_counts=True)):
        counts[order[int(index)]] = int(count)
    return counts
