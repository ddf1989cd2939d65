"""The few entry points that join calibration to scoring: model + data → statistics → metrics →
allocation → PEFT model.

Streaming, checkpoints, offloading and data-parallel runs are arguments of the same
functions. The allocation settings come as an ``AllocationSettings`` or as its fields
in keyword arguments (``compute_allocation(model, batches, avg_rank=8, method="pra")``).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .calibration import CalibrationStatistics, block_statistics, released
from .calibration.distributed import rank_and_world
from .calibration.targets import module_dims, resolve_targets
from .calibration.validate import check_device, check_model
from .files import check_path
from .folders import check_output_folder
from .scoring import Allocation, ModuleMetrics, allocate, module_metrics
from .scoring.allocate import check_budget_fits
from .settings import AllocationSettings, check_adapter_name, check_avg_rank, check_flag, resolve_settings

Batches = Iterable[Mapping[str, torch.Tensor]]


def score_modules(stats: CalibrationStatistics, settings: AllocationSettings | None = None,
                  convention: str = "2/tokens", backend: str | None = None) -> dict[str, ModuleMetrics]:
    """The three metrics of every target module, in model order (each input group is read once)."""
    settings = resolve_settings(settings)
    diag = {g: s.hessian_diag(convention) for g, s in stats.groups.items()}
    eig = {g: s.eigenvalues(convention) for g, s in stats.groups.items()} if settings.scope == "eigen" else {}
    result = {}
    for name, (d_in, d_out) in stats.dims.items():
        group = stats.module_group[name]
        result[name] = module_metrics(diag[group], d_out, group, settings, eig.get(group), backend)
    return result


def allocation_from_statistics(parts: Iterable[CalibrationStatistics], avg_rank: float = 8,
                               settings: AllocationSettings | None = None, *, backend: str | None = None,
                               on_part: Callable[[CalibrationStatistics], None] | None = None,
                               **overrides: Any) -> Allocation:
    """Score the statistics part by part (the whole model, or one block at a time) and allocate.

    Scoring a module reads only its own input group, so scoring per block equals
    scoring the whole model at once; each part is released before the next is made.
    ``on_part`` sees every part before it is released (e.g. to fit an initialisation).
    """
    settings = resolve_settings(settings, **overrides)
    metrics: dict[str, ModuleMetrics] = {}
    n_tokens = n_groups = 0
    for part in parts:
        metrics.update(score_modules(part, settings, backend=backend))
        if on_part is not None:
            on_part(part)
        n_tokens = max(n_tokens, part.n_tokens)
        n_groups += len(part.groups)
        del part  # let this part's Hessians go before the next block is computed
    return allocate(metrics, avg_rank, settings, extra_settings={"n_tokens": n_tokens, "n_groups": n_groups})


def compute_allocation(
    model: nn.Module,
    batches: Batches,
    avg_rank: float = 8,
    settings: AllocationSettings | None = None,
    *,
    target_modules: str | Sequence[str] | None = None,
    backend: str | None = None,
    progress: bool = True,
    streaming: bool = False,
    distributed: bool = False,
    checkpoint_dir: str | None = None,
    device: torch.device | str | None = None,
    cache_device: torch.device | str | None = None,
    **overrides: Any,
) -> Allocation:
    """Calibrate ``model`` on ``batches`` and allocate LoRA ranks (docs/method.md; defaults are the method's).

    streaming: run the model one block at a time (same result, memory of one block's
      statistics); ``checkpoint_dir`` makes such a run resumable; ``device`` moves each
      block there while it runs and ``cache_device`` holds the cached activations (all
      three imply streaming).
    distributed: under torch.distributed (torchrun, accelerate launch), each rank takes
      its shard of ``batches`` (the same list on every rank), the sums are all-reduced,
      and every rank returns the allocation of all the data.

    Everything is checked before any work (settings, r̄, devices, the model, the target modules,
    every batch); the model is exactly as before afterwards, also when an error is raised.
    """
    settings = resolve_settings(settings, **overrides)  # fail on bad settings before the expensive pass
    check_avg_rank(avg_rank)
    for name, flag in (("progress", progress), ("streaming", streaming), ("distributed", distributed)):
        check_flag(name, flag)
    if checkpoint_dir is not None:
        check_path("checkpoint_dir", checkpoint_dir)
    check_device(device), check_device(cache_device, "cache_device")
    check_model(model)
    check_budget_fits({n: module_dims(model.get_submodule(n)) for n in resolve_targets(model, target_modules)},
                      avg_rank, settings)
    if checkpoint_dir is not None:  # checked, not made: the run's lock makes it once every batch has passed
        check_output_folder(checkpoint_dir, "checkpoint folder")
    streaming = streaming or any(v is not None for v in (checkpoint_dir, device, cache_device))
    blocks = block_statistics(model, batches, target_modules, settings.hessian, backend, streaming=streaming,
                              distributed=distributed, checkpoint_dir=checkpoint_dir, device=device,
                              cache_device=cache_device, progress=progress)
    init = None
    if settings.init != "none":
        from .initialisation import PartwiseInit

        init = PartwiseInit(model, avg_rank, settings)  # fits each part's groups before they are released
    try:
        allocation = allocation_from_statistics(released(blocks), avg_rank, settings, backend=backend,
                                                on_part=init.fit if init else None)
        if init is not None:
            allocation = init.finish(allocation)
    finally:
        if init is not None:
            init.close()
    if distributed:
        allocation.settings["world_size"] = rank_and_world()[1]
    return allocation


def sensitivity_peft_model(model: nn.Module, batches: Batches, avg_rank: float = 8, lora_alpha: float | None = None,
                           lora_kwargs: Mapping[str, Any] | None = None, adapter_name: str = "default",
                           **allocation_kwargs: Any):
    """(model, data) → (PEFT model with per-module ranks, the allocation). Ranks are verified; with an
    ``init`` other than ``"none"`` every adapter starts from the allocation's initial A (B = 0).

    ``allocation_kwargs`` go to :func:`compute_allocation` (``settings``, its fields, streaming, ...).
    """
    from .peft import build_peft_model, check_lora_alpha, check_lora_kwargs, lora_config

    check_lora_kwargs({} if lora_kwargs is None else lora_kwargs)  # before the expensive calibration ("" is no mapping)
    check_lora_alpha(lora_alpha)
    check_adapter_name(adapter_name)
    allocation = compute_allocation(model, batches, avg_rank, **allocation_kwargs)
    config = lora_config(allocation, lora_alpha, **dict(lora_kwargs or {}))
    return build_peft_model(model, allocation, config, adapter_name), allocation


def get_peft_model(*args: Any, **kwargs: Any):
    """Deprecated name of :func:`sensitivity_peft_model` (it shadowed ``peft.get_peft_model``, which takes
    other arguments and returns one value); removed in 0.3."""
    import warnings

    warnings.warn("sensitivity_lora.get_peft_model is renamed sensitivity_peft_model (the old name shadowed "
                  "peft.get_peft_model); it will be removed in 0.3", FutureWarning, stacklevel=2)
    return sensitivity_peft_model(*args, **kwargs)


def newton_peft_model(model: nn.Module, batches: Batches, avg_rank: int, *, lora_alpha: float | None = None,
                      labels: Sequence[torch.Tensor] | None = None, target_modules: str | Sequence[str] | None = None,
                      rho: float = 2.0, task_type: str | None = None, damping: float = 0.01, normalise: str = "rows",
                      lora_kwargs: Mapping[str, Any] | None = None, adapter_name: str = "default"):
    """(model, labelled data) → (PEFT model started at the rank-r Newton step's subspace, info); see
    ``sensitivity_lora.init.newton`` and docs/method.md §7.

    One forward + backward over ``batches`` (labels: each batch's ``labels``, else ``labels[i]``, else
    causal-LM labels from input_ids with padding → −100) gives every target's mean-loss gradient G and,
    from the same forward, its input group's Σxxᵀ and n; ranks by the global greedy over σ_i² of
    G·(H + λI)^{-1/2} (Σ r = avg_rank · M, at most round(rho · avg_rank) each, rank 0: no adapter); A = the
    unit-norm rows of V_rᵀ H^{-1/2}, B = 0, α/r = lora_alpha/avg_rank for every module (lora_alpha
    defaults to 2 · avg_rank). ``info``: ``ranks``, ``sigma2`` (each module's σ_i² up to its cap),
    ``predicted_decrease`` (½ Σ_{i≤r} σ_i² per module), ``mean_loss``, ``n_tokens``, ``decompositions``,
    ``seconds`` {gradient_pass, decomposition, peft, total} and ``init`` (the InitResult).
    """
    from .calibration.gradients import gradient_statistics
    from .init import group_sums_from_statistics, newton_init
    from .init.budget import check_whole_rank_budget_fits
    from .init.newton import check_settings, predicted_decrease
    from .peft import build_peft_model_from_ranks, check_lora_alpha, check_lora_kwargs

    check_lora_kwargs({} if lora_kwargs is None else lora_kwargs)
    lora_kwargs = dict(lora_kwargs or {})
    if task_type is not None:
        lora_kwargs["task_type"] = task_type
    check_lora_kwargs(lora_kwargs)  # everything checked before the expensive pass
    check_lora_alpha(lora_alpha)
    check_adapter_name(adapter_name)
    check_settings(avg_rank, rho, damping, normalise=normalise)
    check_model(model)
    check_whole_rank_budget_fits([module_dims(model.get_submodule(n)) for n in resolve_targets(model, target_modules)],
                                 avg_rank, rho)
    start = time.perf_counter()
    passed = gradient_statistics(model, batches, target_modules, labels)
    after_pass = time.perf_counter()
    result = newton_init(passed.gradients, group_sums_from_statistics(passed.statistics), avg_rank, rho,
                         damping=damping, normalise=normalise, order=list(passed.statistics.dims))
    after_init = time.perf_counter()
    weights = {m: a.to(torch.float32) for m, a in result.components.items()}
    peft_model = build_peft_model_from_ranks(model, result.ranks, weights, avg_rank, lora_alpha, adapter_name,
                                             **lora_kwargs)
    end = time.perf_counter()
    info = {
        "ranks": dict(result.ranks), "sigma2": {m: s.tolist() for m, s in result.scores.items()},
        "predicted_decrease": predicted_decrease(result), "mean_loss": passed.mean_loss,
        "n_tokens": passed.statistics.n_tokens, "n_batches": passed.n_batches,
        "decompositions": result.decompositions, "solvers": dict(result.solvers),
        "seconds": {"gradient_pass": after_pass - start, "decomposition": after_init - after_pass,
                    "peft": end - after_init, "total": end - start},
        "init": result,
    }
    return peft_model, info
