"""XᵀX accumulation over masked tokens, upper-triangle tiles only, Triton.

Grid: (upper tile pairs (i ≤ j), token splits). A program owns one output tile
of one split and walks its whole token range, so many sequences go into one
launch: each ``chunk`` of tokens is reduced by ``tl.dot`` with fp32
accumulation (bf16/fp16 operands run on tensor cores), then added to the fp64
output tile. Tiles are owned by one program, so no atomics and the result is
deterministic. Splits (more parallelism when there are few tiles) write to
separate fp64 buffers that are summed afterwards.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import check_accumulator, check_activation, check_device, device_index, interpreting, sm_count
from .sumsq import TOKEN_CHUNK, accumulate_sumsq

# Split buffers beyond this size are not worth it: fewer splits instead.
_MAX_SPLIT_BYTES = 1 << 30


@triton.jit
def _xtx_kernel(
    x_ptr, mask_ptr, out_ptr, pairs_ptr,
    n_tokens, d, stride_t, stride_d, stride_o, stride_split, tokens_per_split,
    CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr,
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pair = tl.program_id(0)
    split = tl.program_id(1)
    ti = tl.load(pairs_ptr + 2 * pair)
    tj = tl.load(pairs_ptr + 2 * pair + 1)
    rm = ti * BLOCK + tl.arange(0, BLOCK)
    rn = tj * BLOCK + tl.arange(0, BLOCK)
    m_ok = rm < d
    n_ok = rn < d
    t_begin = split * tokens_per_split
    t_end = tl.minimum(n_tokens, t_begin + tokens_per_split)
    out_ptrs = out_ptr + split.to(tl.int64) * stride_split + rm[:, None].to(tl.int64) * stride_o + rn[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    for c0 in range(t_begin, t_end, CHUNK):
        c_end = tl.minimum(c0 + CHUNK, t_end)
        part = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for t0 in range(c0, c_end, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            row_ok = rows < c_end
            keep = row_ok
            if HAS_MASK:
                keep = keep & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
            row_off = rows[:, None].to(tl.int64) * stride_t
            # Masked tokens are zero rows of A, which removes them from the product.
            a = tl.load(x_ptr + row_off + rm[None, :] * stride_d, mask=keep[:, None] & m_ok[None, :], other=0.0)
            b = tl.load(x_ptr + row_off + rn[None, :] * stride_d, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:  # fp32/fp64 inputs and the interpreter compute in fp32
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            part = tl.dot(tl.trans(a), b, part, input_precision=PRECISION)
        tile = tl.load(out_ptrs, mask=out_mask, other=0.0)
        tl.store(out_ptrs, tile + part.to(tl.float64), mask=out_mask)


@functools.lru_cache(maxsize=64)
def _upper_pairs(n_tiles: int, device: torch.device) -> torch.Tensor:
    """(i, j) tile indices with i ≤ j, flattened int32, row-major over the upper triangle."""
    return torch.triu_indices(n_tiles, n_tiles).T.contiguous().to(device=device, dtype=torch.int32).flatten()


def _config(dtype: torch.dtype) -> dict:
    if interpreting():
        return dict(BLOCK=16, BLOCK_T=16, num_warps=4, num_stages=1)
    if dtype in (torch.bfloat16, torch.float16):
        return dict(BLOCK=128, BLOCK_T=64, num_warps=8, num_stages=3)
    return dict(BLOCK=64, BLOCK_T=32, num_warps=4, num_stages=3)


def accumulate_xtx(
    acc: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    diag: torch.Tensor | None = None,
    *,
    chunk: int = TOKEN_CHUNK,
    splits: int | None = None,
    block: int | None = None,
    block_t: int | None = None,
) -> None:
    """acc += Σ_t x_t x_tᵀ over masked tokens (upper triangle guaranteed); optionally diag += Σ_t x_t²."""
    mask_u8 = check_activation(x, mask)
    device = check_device(acc, x, diag)
    n, d = x.shape
    check_accumulator(acc, (d, d), "acc")
    if diag is not None:
        check_accumulator(diag, (d,), "diag")
    if n == 0 or d == 0:
        return
    cfg = _config(x.dtype)
    blk = block or cfg["BLOCK"]
    blk_t = block_t or cfg["BLOCK_T"]
    if chunk % blk_t:
        raise ValueError(f"chunk={chunk} must be a multiple of block_t={blk_t}")
    pairs = _upper_pairs(triton.cdiv(d, blk), device)
    n_pairs = pairs.numel() // 2
    n_chunks = triton.cdiv(n, chunk)
    if splits is None:  # enough programs to fill the GPU twice, within a memory cap
        want = triton.cdiv(2 * sm_count(device_index(device)), n_pairs)
        splits = max(1, min(n_chunks, want, _MAX_SPLIT_BYTES // (8 * d * d)))
    if splits < 1:
        raise ValueError(f"splits={splits} must be >= 1")
    tokens_per_split = triton.cdiv(n_chunks, splits) * chunk
    splits = triton.cdiv(n, tokens_per_split)
    direct = splits == 1 and acc.stride(1) == 1
    out = acc if direct else torch.zeros((splits, d, d), dtype=torch.float64, device=device)
    upcast = x.dtype not in (torch.bfloat16, torch.float16) or interpreting()
    _xtx_kernel[(n_pairs, splits)](
        x, mask_u8 if mask_u8 is not None else x, out, pairs,
        n, d, x.stride(0), x.stride(1), out.stride(-2), out.stride(0) if not direct else 0, tokens_per_split,
        CHUNK=chunk, BLOCK_T=blk_t, BLOCK=blk,
        HAS_MASK=mask_u8 is not None, UPCAST=upcast,
        # fp32 operands: 3xTF32 keeps near-fp32 accuracy on tensor cores.
        PRECISION="tf32x3" if x.dtype != torch.float16 and x.dtype != torch.bfloat16 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not direct:
        acc.add_(out.sum(0))
    if diag is not None:
        accumulate_sumsq(diag, x, mask, chunk=chunk)
