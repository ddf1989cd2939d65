"""The three sensitivity metrics of one target matrix (docs/method.md §3).

Trace (global), top-k mean and effective rank (local) of the matrix-level
Hessian diagonal. Scopes:

- ``matrix`` (default): diag(H_row) repeated d_out times, m = d_out · d_in
  (closed form, never materialised);
- ``row``: diag(H_row) alone (d_out = 1), so modules sharing an input get
  identical metrics;
- ``eigen``: the eigenvalues of H_row (clamped at 0) repeated d_out times;
  needs the full Hessian.

The numbers come from the ``diag_stats`` op, so any backend of the op table
can compute them.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import torch

from .. import ops
from ..settings import AllocationSettings


@dataclass(frozen=True)
class ModuleMetrics:
    """The three metrics of one target matrix, its shape and its input group."""

    trace: float
    topk: float
    eff_rank: float
    d_in: int
    d_out: int
    group: str


def _check_vector(values: torch.Tensor, name: str, d_in: int | None = None) -> None:
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.numel() == 0:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got {shape}")
    if d_in is not None and values.numel() != d_in:
        raise ValueError(f"{name} has {values.numel()} entries but diag_h has {d_in}; pass the eigenvalues of the same H_row")
    if not values.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {values.dtype}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} has non-finite entries; check the calibration statistics")


def module_metrics(
    diag_h: torch.Tensor,
    d_out: int,
    group: str,
    settings: AllocationSettings = AllocationSettings(),
    eigvals: torch.Tensor | None = None,
    backend: str | None = None,
) -> ModuleMetrics:
    """Trace, top-k mean and effective rank of one module (docs/method.md §3).

    ``diag_h`` is diag(H_row), shape (d_in,), already normalised; ``eigvals``
    the eigenvalues of H_row (only for scope ``eigen``). ``backend`` forces an
    op-table backend for ``diag_stats``.
    """
    _check_vector(diag_h, "diag_h")
    if isinstance(d_out, bool) or not isinstance(d_out, Integral) or d_out < 1:
        raise ValueError(f"d_out={d_out!r} must be an int >= 1 (the module's output features)")
    d_in = diag_h.numel()
    if settings.scope == "eigen":
        if eigvals is None:
            raise ValueError("eigen scope needs hessian='full' (the eigenvalues of H_row); "
                             "calibrate with hessian='full' or use scope='matrix'")
        _check_vector(eigvals, "eigvals", d_in)
        values, d_eff = eigvals.clamp_min(0.0), int(d_out)  # rounding can make tiny eigenvalues negative
    else:
        if bool((diag_h < 0).any()):
            raise ValueError("diag_h has negative entries; it must be the diagonal of a Hessian (sums of squares)")
        values, d_eff = diag_h, (1 if settings.scope == "row" else int(d_out))
    k = settings.k_for(d_eff * d_in)
    stats = ops.get_op("diag_stats", values.device, backend)(values.contiguous(), d_eff, k, float(settings.energy))
    trace, topk, eff_rank = (float(v) for v in stats.detach().double().cpu().tolist())
    return ModuleMetrics(trace=trace, topk=topk, eff_rank=eff_rank, d_in=int(d_in), d_out=int(d_out), group=str(group))
