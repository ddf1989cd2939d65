"""Per-feature sum of squares (and optionally sum) of masked tokens, Triton.

Grid: (feature blocks, token chunks). Each program reduces one chunk of
``chunk`` tokens for ``BLOCK_D`` features in fp32 and writes an fp64 partial;
the partials are combined in fp64 on the host side of the launch, so the
error does not grow with the total token count (as in reference.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_accumulator, check_activation, check_device, interpreting

TOKEN_CHUNK = 4096


@triton.jit
def _sumsq_kernel(
    x_ptr, mask_ptr, part_sq_ptr, part_sum_ptr,
    n_tokens, d, stride_t, stride_d,
    CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, WITH_SUM: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    sq = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    sm = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    start = pid_c * CHUNK
    for t0 in range(start, tl.minimum(start + CHUNK, n_tokens), BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        keep = rows < n_tokens
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + rows, mask=keep, other=0) != 0)
        ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :].to(tl.int64) * stride_d
        # Upcast right after the load: fp32 arithmetic everywhere (also in the interpreter).
        x = tl.load(ptrs, mask=keep[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        sq += x * x
        if WITH_SUM:
            sm += x
    out = pid_c.to(tl.int64) * d + cols
    tl.store(part_sq_ptr + out, tl.sum(sq, axis=0).to(tl.float64), mask=col_ok)
    if WITH_SUM:
        tl.store(part_sum_ptr + out, tl.sum(sm, axis=0).to(tl.float64), mask=col_ok)


def accumulate_sumsq(
    acc: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    acc_sum: torch.Tensor | None = None,
    *,
    chunk: int = TOKEN_CHUNK,
    block_t: int | None = None,
    block_d: int | None = None,
) -> None:
    """acc += Σ_t x_t² over masked tokens; optionally acc_sum += Σ_t x_t (see reference.py)."""
    mask_u8 = check_activation(x, mask)
    check_device(acc, x, acc_sum)
    n, d = x.shape
    check_accumulator(acc, (d,), "acc")
    if acc_sum is not None:
        check_accumulator(acc_sum, (d,), "acc_sum")
    if n == 0 or d == 0:
        return
    interp = interpreting()
    block_t = block_t or (16 if interp else 32)
    block_d = block_d or (32 if interp else 128)
    if chunk % block_t:
        raise ValueError(f"chunk={chunk} must be a multiple of block_t={block_t}")
    n_chunks = triton.cdiv(n, chunk)
    part_sq = torch.empty((n_chunks, d), dtype=torch.float64, device=x.device)
    part_sum = torch.empty_like(part_sq) if acc_sum is not None else part_sq
    grid = (triton.cdiv(d, block_d), n_chunks)
    _sumsq_kernel[grid](
        x, mask_u8 if mask_u8 is not None else x, part_sq, part_sum,
        n, d, x.stride(0), x.stride(1),
        CHUNK=chunk, BLOCK_T=block_t, BLOCK_D=block_d,
        HAS_MASK=mask_u8 is not None, WITH_SUM=acc_sum is not None,
        num_warps=4,
    )
    acc.add_(part_sq.sum(0))
    if acc_sum is not None:
        acc_sum.add_(part_sum.sum(0))
