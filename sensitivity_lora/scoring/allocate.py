"""From metrics to ranks: the entry point ``allocate`` (docs/method.md §4–§5).

Ties are broken by module order (the insertion order of the metrics mapping,
which is model order).
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Mapping

import numpy as np

from ..settings import AllocationSettings, check_avg_rank, resolve_settings
from .fusion import fuse
from .metrics import ModuleMetrics
from .result import Allocation, ModuleAllocation
from .rules import _exact, allocate_pra, allocate_sra, allocate_uniform, param_budget, rank_budget

# Settings that describe the calibration and the metrics, recorded beside the rule's own.
_RECORDED_ELSEWHERE = ("method", "budget_mode")


def module_caps(metrics: list[ModuleMetrics], avg_rank: float, settings: AllocationSettings) -> np.ndarray:
    """r_max per module: min(d_in, d_out, floor(ρ · r̄)) (ρ = inf: the matrix size); ``r_max`` overrides ρ."""
    size = np.array([min(m.d_in, m.d_out) for m in metrics], dtype=np.int64)
    if settings.r_max is not None:
        return np.minimum(size, int(settings.r_max))
    if math.isinf(settings.rho):
        return size
    return np.minimum(size, math.floor(_exact(settings.rho) * _exact(avg_rank)))


def check_budget_fits(dims: Mapping[str, tuple[int, int]], avg_rank: float, settings: AllocationSettings) -> None:
    """Raise the rule's own ValueError when the budget cannot fit the modules' shapes ({name: (d_in, d_out)}):
    the rule run on equal metrics, so a run is refused before its calibration pass, not after. An integer
    ``topk`` is checked against each module's m diagonal entries here too (the scoring would refuse it
    only after the pass)."""
    for d_in, d_out in dims.values():
        settings.k_for((1 if settings.scope == "row" else d_out) * d_in)  # as module_metrics counts m
    allocate({n: ModuleMetrics(1.0, 1.0, 1.0, d_in, d_out, "") for n, (d_in, d_out) in dims.items()},
             avg_rank, settings)


def allocate(metrics: Mapping[str, ModuleMetrics], avg_rank: float, settings: AllocationSettings | None = None, *,
             extra_settings: Mapping[str, Any] | None = None, **overrides: Any) -> Allocation:
    """Fuse the metrics into θ and allocate ranks under the budget r̄ · M (or its parameter count).

    ``settings`` (or its fields as keyword arguments) choose the rule; ``extra_settings``
    are recorded in ``Allocation.settings`` beside them (e.g. the number of tokens).
    """
    settings = resolve_settings(settings, **overrides)
    check_avg_rank(avg_rank)
    if not metrics:
        raise ValueError("no module metrics: there is nothing to allocate (check target_modules)")
    names = list(metrics)
    mets = [metrics[n] for n in names]
    theta = fuse(np.array([m.trace for m in mets]), np.array([m.topk for m in mets]),
                 np.array([m.eff_rank for m in mets]), settings.fusion)
    caps = module_caps(mets, avg_rank, settings)
    cost = np.array([m.d_in + m.d_out for m in mets], dtype=np.int64)

    recorded = {k: v for k, v in settings.to_dict().items() if k not in _RECORDED_ELSEWHERE}
    if settings.budget_mode == "params":
        budget = param_budget(avg_rank, cost)
        ranks = allocate_sra(theta, avg_rank, settings.r_min, caps, cost=cost, budget=budget)
    else:
        budget = rank_budget(avg_rank, len(names))
        if _exact(avg_rank) * len(names) != budget:
            recorded["budget_rounded_from"] = float(avg_rank) * len(names)
        if settings.method == "sra":
            ranks = allocate_sra(theta, avg_rank, settings.r_min, caps, budget=budget)
        elif settings.method == "pra":
            ranks = allocate_pra(theta, avg_rank, settings.tiers, settings.r_min, caps)
        else:
            ranks = allocate_uniform(len(names), avg_rank, settings.r_min, caps)
    for key, value in (extra_settings or {}).items():
        if key in recorded or key in _RECORDED_ELSEWHERE:
            raise ValueError(f"extra_settings may not override {key!r}; it is an allocation setting")
        recorded[key] = value

    modules = {}
    for name, m, r, t, cap in zip(names, mets, ranks, theta, caps):
        at_bound = "max" if r >= cap else ("min" if r <= settings.r_min else None)
        modules[name] = ModuleAllocation(**asdict(m), rank=int(r), theta=float(t), at_bound=at_bound)
    return Allocation(method=settings.method, avg_rank=float(avg_rank), budget=int(budget),
                      budget_mode=settings.budget_mode, settings=recorded, modules=modules)
