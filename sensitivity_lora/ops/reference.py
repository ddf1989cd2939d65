"""Pure-PyTorch reference of every op in the op table.

These are the oracle in tests and the baseline in benchmarks. Every fast
backend (C++/OpenMP, CUDA, Triton) implements exactly these signatures and
contracts; see ``sensitivity_lora.ops`` for the table.

Conventions shared by all backends:
- Accumulators are float64 and are updated in place.
- ``x`` is a (tokens, d) activation of any floating dtype; ``mask`` is an
  optional (tokens,) bool tensor, True for tokens that count.
- ``accumulate_xtx`` only guarantees the upper triangle (diagonal included) of
  ``acc``; call ``symmetrize_upper`` before reading the whole matrix.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import NotPositiveDefiniteError

# Rows per chunk: partial sums over this many tokens are formed in fp32 and
# combined in fp64, so the error does not grow with the total token count.
TOKEN_CHUNK = 4096


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"expected a (tokens, d) activation, got shape {tuple(x.shape)}")
    if mask is None:
        return x
    if mask.shape != x.shape[:1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match tokens {x.shape[0]}")
    return x[mask.to(device=x.device, dtype=torch.bool)]


def accumulate_sumsq(
    acc: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    acc_sum: torch.Tensor | None = None,
) -> None:
    """acc += Σ_t x_t² (per feature, masked tokens only); optionally acc_sum += Σ_t x_t."""
    x = _masked(x, mask)
    for start in range(0, x.shape[0], TOKEN_CHUNK):
        chunk = x[start : start + TOKEN_CHUNK].float()
        acc.add_(chunk.square().sum(0).double())
        if acc_sum is not None:
            acc_sum.add_(chunk.sum(0).double())


def accumulate_xtx(
    acc: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    diag: torch.Tensor | None = None,
) -> None:
    """acc += Σ_t x_t x_tᵀ (upper triangle guaranteed); optionally diag += Σ_t x_t²."""
    x = _masked(x, mask)
    for start in range(0, x.shape[0], TOKEN_CHUNK):
        chunk = x[start : start + TOKEN_CHUNK].float()
        acc.add_((chunk.T @ chunk).double())
        if diag is not None:
            diag.add_(chunk.square().sum(0).double())


def symmetrize_upper(acc: torch.Tensor) -> torch.Tensor:
    """A full symmetric matrix from the upper triangle of ``acc`` (new tensor)."""
    upper = torch.triu(acc)
    return upper + torch.triu(acc, diagonal=1).T


def diag_stats(diag: torch.Tensor, d_out: int, k: int, alpha: float) -> torch.Tensor:
    """Trace, top-k mean and effective rank of diag(H_row) repeated ``d_out`` times.

    ``k`` counts entries of the repeated (matrix-level) diagonal, 1 ≤ k ≤ d_out·d.
    Returns a float64 tensor [trace, topk_mean, eff_rank] (docs/method.md §3, closed form).
    """
    d = diag.numel()
    m = d_out * d
    if d == 0 or d_out < 1:
        raise ValueError("diag_stats needs a non-empty diagonal and d_out >= 1")
    if not 1 <= k <= m:
        raise ValueError(f"k={k} out of range [1, {m}]")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha={alpha} out of range (0, 1]")
    ell = torch.sort(diag.double().flatten(), descending=True).values
    cum = torch.cumsum(ell, 0)
    total = float(cum[-1])
    q, s = divmod(k, d_out)
    c_q = float(cum[q - 1]) if q > 0 else 0.0
    tail = float(ell[q]) if s > 0 else 0.0
    topk = (d_out * c_q + s * tail) / k
    if total <= 0.0:
        eff = 0.0  # no signal at all: no direction carries any curvature
    else:
        target = alpha * total
        # Smallest i (1-based) with C_i >= α·T; a relative tolerance absorbs
        # rounding in the cumulative sum so that exact fractions land exactly.
        reached = cum >= target * (1.0 - 1e-12)
        i_star = int(torch.nonzero(reached)[0]) + 1
        c_prev = float(cum[i_star - 2]) if i_star > 1 else 0.0
        need = d_out * (target - c_prev) / float(ell[i_star - 1])
        # at most d_out copies of ℓ_{i*} are needed (C_{i*} ≥ α·T); rounding must not push past them
        eff = d_out * (i_star - 1) + min(d_out, max(1, math.ceil(need - 1e-9 * max(1.0, abs(need)))))
    return torch.tensor([d_out * total, topk, float(eff)], dtype=torch.float64, device=diag.device)


def cholesky_damped(
    H: torch.Tensor,
    rel_damp: float = 0.01,
    max_tries: int = 6,
    ladder: float = 10.0,
) -> tuple[torch.Tensor, float, int]:
    """Lower Cholesky factor of H + δ·I with a damping ladder.

    Dead features (diagonal ≤ 0) get a diagonal floor of mean(diag) (at least
    1), as GPTQ-style tools do. Try δ = rel_damp·mean(diag) · ladder^i for
    i = 0..max_tries-1 and return (L, δ, tries) for the first that factors.
    Raises NotPositiveDefiniteError naming what was tried.
    """
    return damped_factorisation(H, rel_damp, max_tries, ladder, torch.linalg.cholesky_ex)


def damped_factorisation(
    H: torch.Tensor,
    rel_damp: float,
    max_tries: int,
    ladder: float,
    factor: Callable[[torch.Tensor], tuple[torch.Tensor, object]],
) -> tuple[torch.Tensor, float, int]:
    """The damping ladder of :func:`cholesky_damped` around any ``factor(A) -> (L, info)``
    (info 0 on success), so that every backend shares one policy."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"cholesky_damped needs a square matrix, got {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise NotPositiveDefiniteError("Hessian has non-finite entries")
    A = H.clone()
    diag = A.diagonal()
    mean_diag = float(diag.clamp_min(0).mean()) if A.numel() else 0.0
    floor = mean_diag if mean_diag > 0 else 1.0
    diag[diag <= 0] = floor
    base = rel_damp * floor
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    tried = []
    for attempt in range(max_tries):
        damp = base * ladder**attempt
        L, info = factor(A + damp * eye)
        tried.append(damp)
        if int(info) == 0:
            return L, damp, attempt + 1
    raise NotPositiveDefiniteError(
        f"matrix of size {A.shape[0]} is not positive definite after damping with "
        f"{', '.join(f'{t:.3g}' for t in tried)} (mean diagonal {mean_diag:.3g}); "
        "raise max_tries or rel_damp, or check the calibration data"
    )


def cholesky_inverse_diag(L: torch.Tensor) -> torch.Tensor:
    """diag(H⁻¹) from the lower Cholesky factor L of H: column sums of squares of L⁻¹."""
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
    return L_inv.square().sum(0)
