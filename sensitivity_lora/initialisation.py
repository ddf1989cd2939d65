"""Adapter initialisation from the calibration statistics (docs/method.md §7): the glue between the
statistics, the allocation and the initialisers of ``sensitivity_lora.init``.

The initialisers read each input group's raw sums (Σxxᵀ, Σx, n) once, never run the model
again, and return A for every module (B = 0). ``covariance`` keeps the allocation's ranks;
``eva`` and ``output-aware`` choose their own under the same budget r̄ · M, and the
allocation's ranks are replaced by theirs (its metrics and θ stay, for reference).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
from torch import nn

from .calibration.statistics import CalibrationStatistics
from .calibration.targets import module_weight
from .init import covariance_init, eva_init, group_sums_from_statistics, output_aware_init
from .init.state import InitResult
from .scoring.result import Allocation
from .settings import AllocationSettings


def merge_parts(parts: Iterable[CalibrationStatistics]) -> CalibrationStatistics:
    """One ``CalibrationStatistics`` from the blocks of a streamed run (disjoint groups, model order kept)."""
    groups, module_group, dims, mode = {}, {}, {}, "full"
    for part in parts:
        groups.update(part.groups)
        module_group.update(part.module_group)
        dims.update(part.dims)
        mode = part.mode
    return CalibrationStatistics(groups, module_group, dims, mode)


def initialise(model: nn.Module, stats: CalibrationStatistics, allocation: Allocation,
               settings: AllocationSettings) -> tuple[Allocation, InitResult]:
    """The allocation with the init's ranks and its initial A matrices attached, and the init's full result."""
    if settings.init == "none":
        raise ValueError("initialise() needs settings.init other than 'none'")
    groups = group_sums_from_statistics(stats)
    order = list(stats.dims)
    avg_rank = _integer_rank(allocation.avg_rank, settings.init)
    if settings.init == "covariance":
        result = covariance_init(groups, allocation.ranks(), order=order)
    elif settings.init == "eva":
        result = eva_init(groups, r=avg_rank, rho=settings.init_rho, order=order)
    else:
        lookup = dict(model.named_modules())
        weights = {name: module_weight(lookup[name]).detach() for name in order}
        result = output_aware_init(weights, groups, avg_rank, settings.init_rho, order=order)
    return with_init(allocation, result, settings), result


def with_init(allocation: Allocation, result: InitResult, settings: AllocationSettings) -> Allocation:
    """``allocation`` carrying ``result``'s ranks (when the init chose them) and its A matrices."""
    modules = allocation.modules
    method, budget = allocation.method, allocation.budget
    if settings.init in ("eva", "output-aware"):
        cap = round(settings.init_rho * allocation.avg_rank)
        modules = {name: dataclasses.replace(m, rank=int(result.ranks[name]),
                                             at_bound=_bound(result.ranks[name], min(cap, m.d_in, m.d_out)))
                   for name, m in modules.items()}
        method, budget = settings.init, int(result.budget)
    recorded = {**allocation.settings, "decompositions": int(result.decompositions)}
    weights = {name: a.to(torch.float32).contiguous() for name, a in result.components.items()}
    return dataclasses.replace(allocation, method=method, budget=budget, modules=modules, settings=recorded,
                               initial_weights=weights)


def _bound(rank: int, cap: int) -> str | None:
    return "max" if rank >= cap else ("min" if rank == 0 else None)


def _integer_rank(avg_rank: float, init: str) -> int:
    if float(avg_rank) != int(avg_rank):
        raise ValueError(f"init={init!r} needs an integer avg_rank (its rank rule works in whole ranks), "
                         f"got {avg_rank}")
    return int(avg_rank)
