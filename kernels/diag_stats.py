"""Trace, top-k mean and effective rank of a Hessian diagonal, Triton.

One program per diagonal: the whole (padded) diagonal is sorted in descending
order with ``tl.sort``, the cumulative sums come from ``tl.cumsum`` and the
closed forms of METHOD.md §3 are evaluated in fp64 (same formulas and
tolerances as reference.diag_stats).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_device

# One program holds the padded diagonal; beyond this size use the reference.
MAX_FEATURES = 1 << 16


@triton.jit
def _diag_stats_kernel(
    diag_ptr, out_ptr, d, d_out, k, q, s, alpha,
    BLOCK: tl.constexpr,
):
    idx = tl.arange(0, BLOCK)
    valid = idx < d
    # Padding sorts last (-inf) and is kept out of every sum with tl.where.
    ell = tl.sort(tl.load(diag_ptr + idx, mask=valid, other=float("-inf")).to(tl.float64), descending=True)
    ell0 = tl.where(valid, ell, 0.0)
    cum = tl.cumsum(ell0, axis=0)
    total = tl.sum(tl.where(idx == d - 1, cum, 0.0), axis=0)
    d_out_f = d_out.to(tl.float64)
    # Top-k of the repeated diagonal: k = q·d_out + s.
    c_q = tl.sum(tl.where(idx == q - 1, cum, 0.0), axis=0)
    tail = tl.sum(tl.where(idx == q, ell0, 0.0), axis=0)
    topk = (d_out_f * c_q + s.to(tl.float64) * tail) / k.to(tl.float64)
    # Effective rank: smallest i with C_i ≥ α·T (relative tolerance as in the reference).
    target = alpha * total
    reached = valid & (cum >= target * (1.0 - 1e-12))
    i_star = tl.min(tl.where(reached, idx, BLOCK), axis=0) + 1
    c_prev = tl.sum(tl.where(idx == i_star - 2, cum, 0.0), axis=0)
    ell_i = tl.sum(tl.where(idx == i_star - 1, ell0, 0.0), axis=0)
    ell_i = tl.where(ell_i != 0.0, ell_i, 1.0)  # only reached when total <= 0 (eff = 0 below)
    need = d_out_f * (target - c_prev) / ell_i
    need = need - 1e-9 * tl.maximum(1.0, tl.abs(need))
    # ceil without libdevice: truncate, then step up when a fraction is left.
    trunc = need.to(tl.int64)
    ceil = trunc + (trunc.to(tl.float64) < need).to(tl.int64)
    eff = d_out.to(tl.int64) * (i_star - 1).to(tl.int64) + tl.maximum(ceil, 1)
    eff_f = tl.where(total > 0.0, eff.to(tl.float64), 0.0)
    tl.store(out_ptr + 0, d_out_f * total)
    tl.store(out_ptr + 1, topk)
    tl.store(out_ptr + 2, eff_f)


def diag_stats(diag: torch.Tensor, d_out: int, k: int, alpha: float) -> torch.Tensor:
    """[trace, topk_mean, eff_rank] (float64) of diag repeated ``d_out`` times; see reference.diag_stats."""
    device = check_device(diag)
    d = diag.numel()
    if d == 0 or d_out < 1:
        raise ValueError("diag_stats needs a non-empty diagonal and d_out >= 1")
    m = d_out * d
    if not 1 <= k <= m:
        raise ValueError(f"k={k} out of range [1, {m}]")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha={alpha} out of range (0, 1]")
    if d > MAX_FEATURES:
        raise ValueError(f"diagonal of {d} features exceeds the Triton kernel's limit {MAX_FEATURES}; use the reference backend")
    q, s = divmod(k, d_out)
    block = max(16, triton.next_power_of_2(d))
    out = torch.empty(3, dtype=torch.float64, device=device)
    _diag_stats_kernel[(1,)](
        diag.contiguous().flatten(), out, d, d_out, k, q, s, float(alpha),
        BLOCK=block, num_warps=min(16, max(4, block // 1024)),
    )
    return out if device.type == "cpu" else out.cpu()
