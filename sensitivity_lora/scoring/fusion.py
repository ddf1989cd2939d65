"""Fusing the three metrics into one score θ per module (docs/method.md §4)."""
from __future__ import annotations

import numpy as np

from ..settings import FUSIONS


def _weight(values: np.ndarray, equal: bool) -> float:
    """σ/μ² of a metric (population σ), or 0.5/μ for the equal-weights ablation; 0 when μ = 0."""
    mu = float(values.mean())
    if mu == 0.0:
        return 0.0  # metrics are ≥ 0, so μ = 0 means all zero: no signal
    return 0.5 / mu if equal else float(values.std()) / mu**2


def fuse(trace: np.ndarray, topk: np.ndarray, eff_rank: np.ndarray, fusion: str = "sigma_mu2") -> np.ndarray:
    """θ per module from the three metrics (float64).

    ``sigma_mu2`` (the method): S_l = w(S_t)·S_t + w(S_e)·S_e, θ = w(S_g)·S_g + w(S_l)·S_l
    with w = σ/μ². Ablations: ``global`` θ = S_g; ``local`` θ = S_l; ``equal`` the
    same two levels with w = 0.5/μ. A metric with σ = 0 (or μ = 0) contributes
    nothing; when nothing is left, θ is uniform (all ones).
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion={fusion!r} is unknown; choose one of {', '.join(FUSIONS)}")
    arrays = [np.asarray(a, dtype=np.float64) for a in (trace, topk, eff_rank)]
    if any(a.ndim != 1 for a in arrays) or len({a.size for a in arrays}) != 1 or arrays[0].size == 0:
        raise ValueError("trace, topk and eff_rank must be non-empty 1-D arrays of the same length, got shapes "
                         f"{[a.shape for a in arrays]}")
    for name, a in zip(("trace", "topk", "eff_rank"), arrays):
        if not np.isfinite(a).all() or (a < 0).any():
            raise ValueError(f"{name} must be finite and >= 0 for every module; check the calibration statistics")
    s_g, s_t, s_e = arrays
    equal = fusion == "equal"
    s_l = _weight(s_t, equal) * s_t + _weight(s_e, equal) * s_e
    if fusion == "global":
        theta = s_g.copy()
    elif fusion == "local":
        theta = s_l
    else:
        theta = _weight(s_g, equal) * s_g + _weight(s_l, equal) * s_l
    if not (theta > 0).any():
        return np.ones_like(theta)
    return theta
