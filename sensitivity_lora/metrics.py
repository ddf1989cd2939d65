"""The three sensitivity metrics of one target matrix (METHOD.md §3).

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

import math
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral, Real

import torch

from . import ops

SCOPES = ("matrix", "row", "eigen")


@dataclass(frozen=True)
class MetricSettings:
    """How the metrics are taken.

    ``topk``: a float in (0, 1] is a fraction of the m entries, k = floor(topk · m)
    (at least 1; the default 0.5 is the method's k = floor(m/2)); an int ≥ 1 is
    an absolute k, which must not exceed m. ``alpha``: the energy share of the
    effective rank, in (0, 1].
    """

    scope: str = "matrix"
    topk: float | int = 0.5
    alpha: float = 0.85

    def validate(self) -> None:
        """Raise ValueError naming the bad field and its allowed range."""
        if self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r} is unknown; choose one of {', '.join(SCOPES)}")
        topk = self.topk
        if isinstance(topk, bool) or not isinstance(topk, Real):
            raise ValueError(f"topk={topk!r} must be a float in (0, 1] (a fraction of the entries) "
                             "or an int >= 1 (an absolute count)")
        if isinstance(topk, Integral):
            if topk < 1:
                raise ValueError(f"topk={topk} as an int is an absolute count and must be >= 1; "
                                 "use a float in (0, 1] for a fraction")
        elif not (math.isfinite(topk) and 0.0 < topk <= 1.0):
            raise ValueError(f"topk={topk} as a float is a fraction and must lie in (0, 1]; "
                             "pass an int for an absolute count")
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, Real) or not (math.isfinite(alpha) and 0.0 < alpha <= 1.0):
            raise ValueError(f"alpha={alpha!r} must lie in (0, 1] (the energy share of the effective rank)")

    def k_for(self, m: int) -> int:
        """The number of top entries averaged for a module with m diagonal entries."""
        if isinstance(self.topk, Integral):
            if self.topk > m:
                raise ValueError(f"topk={self.topk} exceeds the m={m} diagonal entries of a module; "
                                 "lower topk or give it as a fraction in (0, 1]")
            return int(self.topk)
        # The decimal the user wrote (0.29, not 0.28999…), so floor(0.29 · 100) is 29.
        return max(1, math.floor(Fraction(str(float(self.topk))) * m))


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
    settings: MetricSettings = MetricSettings(),
    eigvals: torch.Tensor | None = None,
    backend: str | None = None,
) -> ModuleMetrics:
    """Trace, top-k mean and effective rank of one module (METHOD.md §3).

    ``diag_h`` is diag(H_row), shape (d_in,), already normalised; ``eigvals``
    the eigenvalues of H_row (only for scope ``eigen``). ``backend`` forces an
    op-table backend for ``diag_stats``.
    """
    settings.validate()
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
    stats = ops.get_op("diag_stats", values.device, backend)(values.contiguous(), d_eff, k, float(settings.alpha))
    trace, topk, eff_rank = (float(v) for v in stats.detach().double().cpu().tolist())
    return ModuleMetrics(trace=trace, topk=topk, eff_rank=eff_rank, d_in=int(d_in), d_out=int(d_out), group=str(group))
