"""One labelled forward + backward pass: each target's weight gradient and its input statistics together.

For second-order initialisers (``init/newton.py``) the setup is one pass over labelled batches, as
LoRA-GA's: the same forward that builds the loss feeds the package's calibration hooks (input
groups by tensor identity, Σxxᵀ in full mode, padding excluded, ``accumulate_xtx``), and its
backward gives ∂L/∂W of the target weights only.

- G = (1/#batches) Σ_b ∂L_b/∂W, L_b the model's own mean loss on batch b (``labels``), accumulated
  in fp32 whatever the weights' dtype; nn.Linear's (d_out, d_in) layout (Conv1D's transposed).
- Only the target weights require a gradient during the pass; the model runs in eval mode
  (no dropout); no optimiser. Afterwards every parameter's ``requires_grad``, every module's
  train/eval flag, hooks, attributes and every parameter's ``.grad`` are as before, also when an
  error is raised mid-pass.
- Labels: a batch's own ``labels``, else ``labels[i]`` for batch i, else (a model with an LM head)
  the causal-LM labels input_ids with padding → −100 (the model shifts them).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import CalibrationError
from .forward import _accepts, model_device, prepare_batch, run_model
from .hooks import StatisticsHooks
from .model_state import ModelState
from .statistics import CalibrationStatistics
from .targets import module_dims, resolve_targets
from .validate import check_batches, check_model, real_rows


@dataclass
class GradientStatistics:
    """Mean-loss gradients of the targets (``gradients``, fp32, (d_out, d_in)) and their input statistics."""

    gradients: dict[str, torch.Tensor]
    statistics: CalibrationStatistics  # full mode: Σxxᵀ, Σx, Σx², n per input group
    n_batches: int
    mean_loss: float
    seconds: float


class _GradStatisticsHooks(StatisticsHooks):
    """The calibration hooks, accumulating outside autograd (the layer inputs require grad in this pass)."""

    def _make_hook(self, name: str):
        hook = super()._make_hook(name)

        def no_grad_hook(module: nn.Module, args: tuple) -> None:
            with torch.no_grad():
                hook(module, args)

        return no_grad_hook


def causal_lm_labels(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """input_ids with the padding (attention_mask == 0) set to −100."""
    labels = batch["input_ids"].clone()
    mask = batch.get("attention_mask")
    if mask is not None:
        labels[~mask.to(torch.bool)] = -100
    return labels


def gradient_statistics(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
                        target_modules: str | Sequence[str] | None = None,
                        labels: Sequence[torch.Tensor] | None = None, backend: str | None = None
                        ) -> GradientStatistics:
    """One forward + backward per batch: the targets' mean-loss gradients and their input statistics (full)."""
    check_model(model)
    names = resolve_targets(model, target_modules)
    batches = check_batches(model, batches)
    if labels is not None and len(labels) != len(batches):
        raise ValueError(f"labels has {len(labels)} entries for {len(batches)} batches; give one per batch")
    if labels is None and not all("labels" in b for b in batches) and _lm_head(model) is None:
        raise ValueError("this model has no LM head, so causal-LM labels cannot be made: pass labels= (one "
                         "tensor per batch) or put 'labels' in every batch")
    lookup = dict(model.named_modules())
    modules = {n: lookup[n] for n in names}
    dims = {n: module_dims(m) for n, m in modules.items()}
    weights = {n: m.weight for n, m in modules.items()}
    device = model_device(model)
    grads_before = {id(p): p.grad for p in model.parameters()}
    state = ModelState.capture(model)
    sums = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for n, w in weights.items()}
    extra = {"use_cache": False} if _accepts(model, "use_cache") else {}  # logits are needed: all of them
    start, total_loss = time.perf_counter(), 0.0
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.grad = None
            w.requires_grad_(True)
        with _GradStatisticsHooks(modules, "full", backend) as hooks, torch.enable_grad():
            for index, batch in enumerate(batches):
                kwargs, mask = prepare_batch(batch, device, index)
                ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
                target = batch.get("labels") if labels is None else labels[index]
                if target is None:
                    target = causal_lm_labels(batch)
                hooks.context.set(mask, real_rows(mask, int(ids.shape[0])), int(ids.shape[0] * ids.shape[1]))
                output = run_model(model, {**kwargs, **extra, "labels": target.to(device)}, index)
                loss = output.loss if hasattr(output, "loss") else output["loss"]
                if loss is None or not torch.is_tensor(loss) or loss.ndim != 0:
                    raise CalibrationError(f"batch {index}: the model returned no scalar loss for these labels")
                loss.backward()
                total_loss += float(loss.detach())
                for n, w in weights.items():
                    if w.grad is not None:
                        sums[n] += w.grad.float()
                        w.grad = None
            statistics = hooks.result(dims)
    finally:
        state.restore()  # requires_grad flags, train/eval flags, hooks, attributes
        for p in model.parameters():
            p.grad = grads_before.get(id(p))
    n = len(batches)
    gradients = {name: _linear_layout(modules[name], sums[name] / n) for name in names}
    return GradientStatistics(gradients, statistics, n, total_loss / n, time.perf_counter() - start)


def _linear_layout(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    return grad if isinstance(module, nn.Linear) else grad.T.contiguous()  # Conv1D stores (d_in, d_out)


def _lm_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None
