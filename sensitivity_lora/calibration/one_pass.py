"""One-pass calibration: hooks on every target module, the batches run through the whole model once."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import CalibrationError
from ..progress import progress_bar
from ..settings import check_flag, check_hessian
from .forward import forward_kwargs, model_device, prepare_batch, preserved_state, run_model
from .hooks import StatisticsHooks
from .statistics import CalibrationStatistics
from .targets import module_dims, resolve_targets
from .validate import check_backend, check_batches, check_model, real_rows


def calibrate(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    target_modules: str | Sequence[str] | None = None,
    hessian: str = "diag",
    backend: str | None = None,
    progress: bool = True,
) -> CalibrationStatistics:
    """Run ``batches`` through ``model`` once and return per-input-group statistics.

    The model's weights, dtype, device and train/eval mode are unchanged afterwards;
    hooks are removed also when an error is raised.
    """
    check_hessian(hessian)
    check_flag("progress", progress)
    check_model(model)
    names = resolve_targets(model, target_modules)
    device = model_device(model)
    check_backend(backend, {device}, hessian)  # the hooks would find an unknown backend only in the first pass
    batches = check_batches(model, batches)  # every batch checked before the first forward pass
    lookup = dict(model.named_modules())
    modules = {n: lookup[n] for n in names}
    dims = {n: module_dims(m) for n, m in modules.items()}
    extra = forward_kwargs(model, modules.values())
    seen_batches = 0
    with preserved_state(model), StatisticsHooks(modules, hessian, backend) as hooks:
        for index, batch in enumerate(progress_bar(batches, progress)):
            kwargs, mask = prepare_batch(batch, device, index)
            ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
            hooks.context.set(mask, real_rows(mask, int(ids.shape[0])), int(ids.shape[0] * ids.shape[1]))
            run_model(model, {**kwargs, **extra}, index)
            seen_batches += 1
    if seen_batches == 0:
        raise CalibrationError("no calibration batches were given; pass at least one batch of text")
    return hooks.result(dims)
