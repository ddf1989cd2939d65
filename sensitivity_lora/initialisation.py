"""Adapter initialisation from the calibration statistics (docs/method.md §7): the glue between the
statistics, the allocation and the initialisers of ``sensitivity_lora.init``.

The initialisers read each input group's raw sums (Σxxᵀ, Σx, n) once and never run the model
again. They work part by part (the whole model, or one streamed block at a time): each part's
groups are decomposed as the part arrives, keeping only every module's top directions up to its
rank cap and their scores, so memory stays that of one block; the ranks are chosen at the end,
over all modules (``covariance``: the allocation's ranks; ``eva`` and ``output-aware``: their own
global greedy under the same budget r̄ · M, replacing the allocation's ranks — its metrics and θ
stay, for reference), and every module takes the prefix of its directions. B = 0.

Overlap: when the statistics live on a GPU, each part is decomposed in a worker thread on its own
CUDA stream while the caller calibrates the next block, so the eigendecomposition hides behind
the forward pass; one part at most is in flight (memory: two blocks' statistics, and the worker's
working set: one batch of its covariances in fp64 with their fp32 copies, ~2.5 GB at d = 14336,
held in the side stream's share of the CUDA cache). On the CPU
the same cores would do both, so parts are decomposed in turn. Either way the numbers are the
same: each part runs the same operations on the same data.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch import nn

from .calibration.statistics import CalibrationStatistics
from .calibration.targets import module_weight
from .init import (covariance_init, default_gain_rows, eva_init, greedy_ranks, group_sums_from_statistics,
                   output_aware_init)
from .init.state import InitResult
from .scoring.allocate import module_caps
from .scoring.result import Allocation
from .settings import AllocationSettings


class _Fitted(NamedTuple):
    """One part's initialisation: every module's scores and rows, the decompositions done, the solvers used."""

    scores: dict[str, torch.Tensor]
    rows: dict[str, torch.Tensor]
    decompositions: int
    solvers: dict[str, str]


class PartwiseInit:
    """Fits each calibration part as it comes (:meth:`fit`), then chooses the ranks (:meth:`finish`)."""

    def __init__(self, model: nn.Module, avg_rank: float, settings: AllocationSettings, *,
                 overlap: bool | None = None) -> None:
        """``overlap``: decompose parts in a worker thread while the next is calibrated (default: when the
        statistics are on a GPU)."""
        if settings.init == "none":
            raise ValueError("PartwiseInit needs settings.init other than 'none'")
        own_ranks = settings.init != "covariance"  # eva / output-aware choose ranks by their own whole-rank rule
        if own_ranks and float(avg_rank) != int(avg_rank):
            raise ValueError(f"init={settings.init!r} needs an integer avg_rank (its rank rule works in whole ranks), "
                             f"got {avg_rank}")
        self.model, self.settings = model, settings
        self.avg_rank = int(avg_rank) if own_ranks else float(avg_rank)
        self.cap = round(settings.init_rho * self.avg_rank)  # the eva / output-aware rules' cap
        self.scores: dict[str, torch.Tensor] = {}
        self.rows: dict[str, torch.Tensor] = {}
        self.decompositions = 0
        self.solvers: dict[str, str] = {}
        self.overlap = overlap
        self._worker: ThreadPoolExecutor | None = None
        self._pending: tuple[Future, object] | None = None  # (the worker's future, its CUDA stream or None)
        self._side_streams: dict[torch.device, object] = {}  # one side stream per GPU

    def fit(self, part: CalibrationStatistics) -> None:
        """Every module of ``part``: its directions up to its cap (rows, fp64) and their scores; in a worker
        thread when overlapping (then an error surfaces at the next :meth:`fit` or at :meth:`finish`)."""
        self._wait()  # one part in flight at most, and its results merged here, on the caller's thread
        groups = group_sums_from_statistics(part)
        order = list(part.dims)
        weights = None
        if self.settings.init == "output-aware":  # read the model here: the caller may restore it meanwhile
            lookup = dict(self.model.named_modules())
            weights = {name: module_weight(lookup[name]).detach() for name in order}
        device = next(iter(groups.values())).xtx.device if groups else torch.device("cpu")
        overlap = self.overlap if self.overlap is not None else device.type == "cuda"
        if not overlap:
            self._merge(self._fit(part, groups, weights))
            return
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sensitivity-lora-init")
        stream = ready = None
        if device.type == "cuda":  # the side stream starts once the statistics are written on this one
            stream = self._side_streams.setdefault(device, torch.cuda.Stream(device))
            ready = torch.cuda.current_stream(device).record_event()
        self._pending = (self._worker.submit(self._fit_aside, part, groups, weights, stream, ready), stream)

    def close(self) -> None:
        """Wait for the part in flight (its error, if any, is dropped) and stop the worker thread."""
        try:
            self._wait()
        except Exception:  # noqa: BLE001 - closing after another error: that one is the one to report
            pass
        finally:
            if self._worker is not None:
                self._worker.shutdown(wait=True)
                self._worker = None

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        future, stream = pending
        got = future.result()
        if stream is not None:  # made on the side stream, read and freed on the caller's from now on
            caller = torch.cuda.current_stream(stream.device)
            caller.wait_stream(stream)
            for tensor in (*got.rows.values(), *got.scores.values()):
                tensor.record_stream(caller)
        self._merge(got)

    def _fit_aside(self, part: CalibrationStatistics, groups: dict, weights: dict | None, stream, ready) -> _Fitted:
        if stream is None:
            return self._fit(part, groups, weights)
        try:
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                return self._fit(part, groups, weights)
        finally:
            stream.synchronize()  # the part's memory is reused once released: only after its last kernel

    def _fit(self, part: CalibrationStatistics, groups: dict, weights: dict | None) -> _Fitted:
        order = list(part.dims)
        init = self.settings.init
        if init == "covariance":  # up to the allocation's cap; the allocation picks the ranks later
            from .scoring.metrics import ModuleMetrics

            metrics = [ModuleMetrics(0.0, 0.0, 0.0, d_in, d_out, "") for d_in, d_out in part.dims.values()]
            caps = module_caps(metrics, self.avg_rank, self.settings)
            result = covariance_init(groups, {m: int(c) for m, c in zip(order, caps)}, order=order)
        elif init == "eva":  # ρ = 1 with r = the cap: every module keeps all its candidate directions
            result = eva_init(groups, r=self.cap, rho=1.0, order=order)
        else:
            result = output_aware_init(weights, groups, self.cap, 1.0, order=order)
        rows = _scaled(result.components, groups, self.settings.init_scale)
        return _Fitted(result.scores, rows, result.decompositions, result.solvers)

    def _merge(self, got: _Fitted) -> None:
        self.scores.update(got.scores)
        self.rows.update(got.rows)
        self.decompositions += got.decompositions
        self.solvers.update(got.solvers)

    def finish(self, allocation: Allocation) -> Allocation:
        """``allocation`` with the init's ranks (for eva / output-aware) and its initial A attached."""
        self._wait()
        self.close()
        order = list(allocation.modules)
        missing = [m for m in order if m not in self.rows]
        if missing:
            raise RuntimeError(f"the initialisation saw no statistics for {len(missing)} modules (e.g. {missing[0]})")
        init = self.settings.init
        if init == "covariance":
            ranks = allocation.ranks()
        else:
            ranks = greedy_ranks(self.scores, self.avg_rank * len(order), order)
        result = InitResult(method=init, ranks=ranks, components={m: self.rows[m][: ranks[m]] for m in order},
                            scores=self.scores, budget=sum(ranks.values()), decompositions=self.decompositions,
                            solvers=self.solvers)
        return with_init(allocation, result, self.settings)


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
    used = list(result.solvers.values())
    recorded = {**allocation.settings, "decompositions": int(result.decompositions),
                "eigen_solvers": {s: used.count(s) for s in sorted(set(used))}}  # which solver took how many groups
    weights = {name: a.to(torch.float32).contiguous() for name, a in result.components.items()}
    return dataclasses.replace(allocation, method=method, budget=budget, modules=modules, settings=recorded,
                               initial_weights=weights)


def _scaled(rows: dict[str, torch.Tensor], groups: dict, init_scale: str) -> dict[str, torch.Tensor]:
    """Each module's rows at the length ``init_scale`` asks (a prefix of a scaled set is the scaled prefix:
    every row is scaled on its own)."""
    if init_scale == "unit":
        return rows
    sums = {m: g for g in groups.values() for m in g.members}
    return {m: default_gain_rows(a, sums[m].xtx, sums[m].n_tokens) for m, a in rows.items()}


def _bound(rank: int, cap: int) -> str | None:
    return "max" if rank >= cap else ("min" if rank == 0 else None)
