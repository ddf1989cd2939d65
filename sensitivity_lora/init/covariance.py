"""Covariance and second moment of one input group, from its raw sums.

From a calibration pass over n non-padding tokens with inputs x_t ∈ R^d:

    S = Σ_t x_t x_tᵀ   (d × d),   s = Σ_t x_t   (d,),   μ = s / n

    centred covariance   C = (S − n μ μᵀ) / (n − 1)      (what EVA's PCA decomposes)
    second moment        M = S / n                       (= H/2 in the 2/tokens convention)

Both are computed in fp64 whatever the input dtype: activations with a large mean
(massive activations) make S − nμμᵀ a difference of large numbers. The result is
exactly symmetric, so eigen solvers see a symmetric matrix: a symmetric S (what calibration
gives) stays so through elementwise operations of one rounding each, any other S is
symmetrised first ((S + Sᵀ)/2).
"""
from __future__ import annotations

import math
import operator

import torch


def centred_covariance(xtx: torch.Tensor, total: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """C = (S − s sᵀ / n) / (n − 1) in fp64, from S = Σxxᵀ, s = Σx and the token count n (≥ 2)."""
    s_mat = _check_xtx(xtx)
    if total is None:
        raise ValueError("the centred covariance needs Σx; calibrate statistics that carry .sum (Σx)")
    if not isinstance(total, torch.Tensor) or total.shape != (s_mat.shape[0],):
        shape = tuple(total.shape) if isinstance(total, torch.Tensor) else type(total).__name__
        raise ValueError(f"Σx must be a ({s_mat.shape[0]},) tensor matching Σxxᵀ, got {shape}")
    n = _check_count(n_tokens, minimum=2, why="a covariance needs at least 2 tokens")
    s = total.to(device=s_mat.device, dtype=torch.float64)
    # S/(n−1) − u uᵀ, u = s/√(n(n−1)): one rounding per operation and entry (no fused multiply-add, which
    # vectorised and scalar code paths apply differently), so (i, j) and (j, i) round alike when S is symmetric
    u = s / math.sqrt(n * (n - 1))
    cov = _symmetric(s_mat) * (1.0 / (n - 1))
    return cov.sub_(torch.outer(u, u))


def second_moment(xtx: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """M = S / n in fp64 (the uncentred second moment of the inputs)."""
    s_mat = _check_xtx(xtx)
    n = _check_count(n_tokens, minimum=1, why="no tokens were seen")
    return _symmetric(s_mat) / n


# E[(a·x)²] of a row of PEFT's default A (Kaiming uniform, a = √5: entries U(±1/√d)) is tr(M) / (3d).
KAIMING_ROW_ENERGY = 1.0 / 3.0


def default_gain_rows(rows: torch.Tensor, xtx: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """``rows`` (k, d) rescaled so that each gives E[(a·x)²] = tr(M)/(3d), M = S/n: what a row of PEFT's
    default A gives. With B = 0, Adam moves B by about the learning rate per entry, so the adapter's
    output moves per step in proportion to |A x|: matched rows keep plain LoRA's step size (and its
    learning rate) and change only the directions. Zero-energy rows stay zero."""
    if rows.ndim != 2 or rows.shape[1] != xtx.shape[-1]:
        raise ValueError(f"rows must be (k, {xtx.shape[-1]}) to match Σxxᵀ, got {tuple(rows.shape)}")
    s_mat = _symmetric(_check_xtx(xtx))
    n = _check_count(n_tokens, minimum=1, why="no tokens were seen")
    target = KAIMING_ROW_ENERGY * float(torch.diagonal(s_mat).sum()) / (n * s_mat.shape[0])
    r64 = rows.to(torch.float64)
    energy = ((r64 @ s_mat) * r64).sum(dim=1) / n  # aᵀ M a with M = S/n, without forming M
    scale = torch.where(energy > 0, (target / energy.clamp_min(torch.finfo(torch.float64).tiny)).sqrt(),
                        torch.zeros_like(energy))
    return (r64 * scale.unsqueeze(1)).to(rows.dtype)


def _check_xtx(xtx: torch.Tensor) -> torch.Tensor:
    if xtx is None:
        raise ValueError("Σxxᵀ is missing: calibrate with hessian='full' to get the full input statistics")
    if not isinstance(xtx, torch.Tensor) or xtx.ndim != 2 or xtx.shape[0] != xtx.shape[1]:
        shape = tuple(xtx.shape) if isinstance(xtx, torch.Tensor) else type(xtx).__name__
        raise ValueError(f"Σxxᵀ must be a square (d, d) tensor, got {shape}")
    return xtx.to(torch.float64)


def _symmetric(s_mat: torch.Tensor) -> torch.Tensor:
    """``s_mat`` itself when exactly symmetric (one comparison pass, no copy), else (S + Sᵀ)/2."""
    return s_mat if torch.equal(s_mat, s_mat.T) else (s_mat + s_mat.T) * 0.5


def _check_count(n_tokens: int, minimum: int, why: str) -> int:
    try:
        n = operator.index(n_tokens) if not isinstance(n_tokens, bool) else None
    except TypeError:
        n = None
    if n is None or n < minimum:
        raise ValueError(f"token count must be an integer >= {minimum} ({why}), got {n_tokens!r}")
    return int(n)
