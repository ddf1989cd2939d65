"""The whole method in a few calls: model + data → statistics → metrics → allocation → PEFT model."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .allocation import Allocation, allocate
from .capture import CalibrationStatistics, calibrate
from .metrics import MetricSettings, ModuleMetrics, module_metrics
from .statistics import HESSIAN_MODES

Batches = Iterable[Mapping[str, torch.Tensor]]


def score_modules(stats: CalibrationStatistics, settings: MetricSettings = MetricSettings(),
                  convention: str = "2/tokens", backend: str | None = None) -> dict[str, ModuleMetrics]:
    """The three metrics of every target module, in model order (each input group is read once)."""
    settings.validate()
    diag = {g: s.hessian_diag(convention) for g, s in stats.groups.items()}
    eig = {g: s.eigenvalues(convention) for g, s in stats.groups.items()} if settings.scope == "eigen" else {}
    result = {}
    for name, (d_in, d_out) in stats.dims.items():
        group = stats.module_group[name]
        result[name] = module_metrics(diag[group], d_out, group, settings, eig.get(group), backend)
    return result


def _check_settings(avg_rank: float, hessian: str, settings: MetricSettings) -> None:
    """Fail on bad settings before the (expensive) calibration pass."""
    if not avg_rank > 0:
        raise ValueError(f"avg_rank must be positive, got {avg_rank}")
    if hessian not in HESSIAN_MODES:
        raise ValueError(f"hessian must be one of {', '.join(HESSIAN_MODES)}, got {hessian!r}")
    settings.validate()
    if settings.scope == "eigen" and hessian != "full":
        raise ValueError("scope='eigen' needs the full Hessian: use hessian='full'")


def allocation_from_statistics(
    parts: Iterable[CalibrationStatistics],
    avg_rank: float = 8,
    method: str = "sra",
    hessian: str = "diag",
    scope: str = "matrix",
    topk: float | int = 0.5,
    alpha: float = 0.85,
    fusion: str = "sigma_mu2",
    r_min: int = 1,
    rho: float = 4.0,
    r_max: int | None = None,
    budget_mode: str = "rank",
    tiers: int = 3,
    backend: str | None = None,
) -> Allocation:
    """Score the statistics part by part (the whole model, or one block at a time) and allocate.

    Scoring a module reads only its own input group, so scoring per block equals
    scoring the whole model at once; each part is released before the next is made.
    """
    settings = MetricSettings(scope=scope, topk=topk, alpha=alpha)
    metrics: dict[str, ModuleMetrics] = {}
    n_tokens = n_groups = 0
    for part in parts:
        metrics.update(score_modules(part, settings, backend=backend))
        n_tokens = max(n_tokens, part.n_tokens)
        n_groups += len(part.groups)
        del part  # let this part's Hessians go before the next block is computed
    extra = {"hessian": hessian, "scope": scope, "topk": topk, "alpha": alpha, "n_tokens": n_tokens, "n_groups": n_groups}
    return allocate(metrics, avg_rank, method=method, fusion=fusion, r_min=r_min, rho=rho, r_max=r_max,
                    budget_mode=budget_mode, tiers=tiers, extra_settings=extra)


def compute_allocation(
    model: nn.Module,
    batches: Batches,
    avg_rank: float = 8,
    method: str = "sra",
    hessian: str = "diag",
    target_modules: str | Sequence[str] | None = None,
    scope: str = "matrix",
    topk: float | int = 0.5,
    alpha: float = 0.85,
    fusion: str = "sigma_mu2",
    r_min: int = 1,
    rho: float = 4.0,
    r_max: int | None = None,
    budget_mode: str = "rank",
    tiers: int = 3,
    backend: str | None = None,
    progress: bool = True,
    streaming: bool = False,
    checkpoint_dir: str | None = None,
    device: torch.device | str | None = None,
    cache_device: torch.device | str | None = None,
) -> Allocation:
    """Calibrate ``model`` on ``batches`` and allocate LoRA ranks (METHOD.md; defaults are the method's).

    ``streaming=True`` runs the model one block at a time (same result, memory of one
    block's statistics); ``checkpoint_dir`` makes such a run resumable; ``device`` moves
    each block there while it runs and ``cache_device`` holds the cached activations
    (both imply streaming).
    """
    _check_settings(avg_rank, hessian, MetricSettings(scope=scope, topk=topk, alpha=alpha))
    if streaming or checkpoint_dir is not None or device is not None or cache_device is not None:
        from .checkpoint import BlockCheckpoint
        from .streaming import iter_block_statistics, released

        checkpoint = BlockCheckpoint(checkpoint_dir) if checkpoint_dir is not None else None
        parts = released(iter_block_statistics(model, batches, target_modules, hessian, backend, device=device,
                                               cache_device=cache_device, checkpoint=checkpoint, progress=progress))
    else:
        parts = [calibrate(model, batches, target_modules, hessian, backend, progress)]
    return allocation_from_statistics(parts, avg_rank, method, hessian, scope, topk, alpha, fusion, r_min, rho,
                                      r_max, budget_mode, tiers, backend)


def get_peft_model(model: nn.Module, batches: Batches, avg_rank: float = 8, lora_alpha: float | None = None,
                   lora_kwargs: Mapping[str, Any] | None = None, adapter_name: str = "default",
                   **allocation_kwargs: Any):
    """(model, data) → (PEFT model with per-module ranks, the allocation). Ranks are verified."""
    from peft import get_peft_model as peft_get_peft_model

    from .peft_integration import check_lora_kwargs, lora_config, verify_ranks

    check_lora_kwargs(lora_kwargs or {})  # before the expensive calibration
    allocation = compute_allocation(model, batches, avg_rank, **allocation_kwargs)
    config = lora_config(allocation, lora_alpha, **dict(lora_kwargs or {}))
    peft_model = peft_get_peft_model(model, config, adapter_name=adapter_name)
    try:
        verify_ranks(peft_model, allocation, adapter_name)
    except BaseException:
        peft_model.unload()  # PEFT injected layers into ``model`` in place: take them out again
        raise
    return peft_model, allocation
