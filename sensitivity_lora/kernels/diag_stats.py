"""Trace, top-k mean and effective rank of a Hessian diagonal, Triton.

A selection scheme instead of a full sort, so one program handles any d with
a bounded tile and compiles quickly: the j-th largest entry is found by
bisection on the fp64 bit pattern (order-preserving for entries ≥ 0), and the
cumulative sum C_i of the sorted diagonal is the sum of the entries ≥ the
i-th largest one (ties resolved in closed form). The closed forms of
docs/method.md §3 are then evaluated in fp64, with the reference's tolerances.
Entries must be ≥ 0 (they are sums of squares); negative ones count as 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_device, interpreting


@triton.jit
def _count_sum_ge(diag_ptr, d, key, BLOCK: tl.constexpr):
    """Number and sum of the entries whose bit pattern is ≥ key."""
    cnt = tl.zeros((BLOCK,), dtype=tl.int64)
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for t0 in range(0, d, BLOCK):
        idx = t0 + tl.arange(0, BLOCK)
        ok = idx < d
        v = tl.load(diag_ptr + idx, mask=ok, other=0.0).to(tl.float64)
        v = tl.where(v > 0.0, v, 0.0)  # also maps -0.0 and NaN to +0.0
        sel = ok & (v.to(tl.int64, bitcast=True) >= key)
        cnt += sel.to(tl.int64)
        acc += tl.where(sel, v, 0.0)
    return tl.sum(cnt, axis=0), tl.sum(acc, axis=0)


@triton.jit
def _jth_largest_key(diag_ptr, d, j, BLOCK: tl.constexpr):
    """Bit pattern of the j-th largest entry (1-based): the largest key with count(≥ key) ≥ j."""
    lo = tl.zeros((), dtype=tl.int64)  # count(≥ 0) = d ≥ j
    hi = tl.full((), 0x7FF0000000000000, dtype=tl.int64)  # count(≥ inf) = 0 < j
    for _ in range(64):
        mid = lo + (hi - lo) // 2
        cnt, _s = _count_sum_ge(diag_ptr, d, mid, BLOCK)
        ok = cnt >= j
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    return lo


@triton.jit
def _diag_stats_kernel(diag_ptr, alpha_ptr, out_ptr, d, d_out, k, q, s, BLOCK: tl.constexpr):
    alpha = tl.load(alpha_ptr)  # fp64 from memory: a Python float argument would be fp32
    _n, total = _count_sum_ge(diag_ptr, d, 0, BLOCK)
    d_out_f = d_out.to(tl.float64)
    # Top-k of the repeated diagonal, k = q·d_out + s: C_q and ℓ_{q+1}.
    c_q = tl.zeros((), dtype=tl.float64)
    if q > 0:
        key_q = _jth_largest_key(diag_ptr, d, q, BLOCK)
        ell_q = key_q.to(tl.float64, bitcast=True)
        n_gt, s_gt = _count_sum_ge(diag_ptr, d, key_q + 1, BLOCK)
        c_q = s_gt + (q - n_gt).to(tl.float64) * ell_q
    tail = tl.zeros((), dtype=tl.float64)
    if s > 0:
        tail = _jth_largest_key(diag_ptr, d, q + 1, BLOCK).to(tl.float64, bitcast=True)
    topk = (d_out_f * c_q + s.to(tl.float64) * tail) / k.to(tl.float64)
    # Effective rank: i* = smallest i with C_i ≥ α·T (relative tolerance as in the reference).
    target = alpha * total
    goal = target * (1.0 - 1e-12)
    lo = tl.zeros((), dtype=tl.int64)
    hi = tl.full((), 0x7FF0000000000000, dtype=tl.int64)
    for _ in range(64):  # largest key whose sum(≥ key) still reaches the goal: that is ℓ_{i*}
        mid = lo + (hi - lo) // 2
        _c, sm = _count_sum_ge(diag_ptr, d, mid, BLOCK)
        ok = sm >= goal
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    ell_i = lo.to(tl.float64, bitcast=True)
    n_gt, s_gt = _count_sum_ge(diag_ptr, d, lo + 1, BLOCK)
    safe = tl.where(ell_i > 0.0, ell_i, 1.0)  # ell_i = 0 only when T = 0 (eff = 0 below)
    # Within a run of entries equal to ell_i, C grows by ell_i per step.
    steps = (goal - s_gt) / safe
    j_t = steps.to(tl.int64)
    j = tl.maximum(j_t + (j_t.to(tl.float64) < steps).to(tl.int64), 1)
    i_star = n_gt + j
    c_prev = s_gt + (j - 1).to(tl.float64) * ell_i
    need = d_out_f * (target - c_prev) / safe
    need = need - 1e-9 * tl.maximum(1.0, tl.abs(need))
    n_t = need.to(tl.int64)  # ceil without libdevice: truncate, step up if a fraction is left
    ceil = n_t + (n_t.to(tl.float64) < need).to(tl.int64)
    # 1 ≤ entries taken from ℓ_{i*} ≤ d_out: the clamp absorbs rounding between separately summed totals.
    eff = d_out.to(tl.int64) * (i_star - 1) + tl.minimum(tl.maximum(ceil, 1), d_out.to(tl.int64))
    tl.store(out_ptr + 0, d_out_f * total)
    tl.store(out_ptr + 1, topk)
    tl.store(out_ptr + 2, tl.where(total > 0.0, eff.to(tl.float64), 0.0))


def diag_stats(diag: torch.Tensor, d_out: int, k: int, alpha: float, *, block: int | None = None) -> torch.Tensor:
    """[trace, topk_mean, eff_rank] (float64, CPU) of diag repeated ``d_out`` times; see reference.diag_stats."""
    device = check_device(diag)
    d = diag.numel()
    if d == 0 or d_out < 1:
        raise ValueError("diag_stats needs a non-empty diagonal and d_out >= 1")
    m = d_out * d
    if not 1 <= k <= m:
        raise ValueError(f"k={k} out of range [1, {m}]")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha={alpha} out of range (0, 1]")
    q, s = divmod(k, d_out)
    block = block or min(triton.next_power_of_2(d), 64 if interpreting() else 1024)
    out = torch.empty(3, dtype=torch.float64, device=device)
    alpha_t = torch.tensor([float(alpha)], dtype=torch.float64, device=device)
    _diag_stats_kernel[(1,)](
        diag.detach().contiguous().flatten().double(), alpha_t, out, d, d_out, k, q, s,
        BLOCK=max(16, block), num_warps=4,
    )
    return out  # on the input's device, like every backend
