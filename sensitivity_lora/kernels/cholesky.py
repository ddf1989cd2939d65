"""Blocked right-looking Cholesky whose trailing update is a Triton kernel.

For each panel of ``panel`` columns: factor the diagonal block with
``torch.linalg.cholesky_ex``, solve the panel below it (triangular solve),
then subtract P·Pᵀ from the trailing matrix, lower-triangle tiles only (the
Triton SYRK kernel, accumulating in the matrix's dtype). ``cholesky_damped``
wraps it in the same damping ladder as reference.cholesky_damped.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import check_device, interpreting

# One damping policy and one error type for every backend.
from sensitivity_lora.ops.reference import NotPositiveDefiniteError, damped_factorisation  # noqa: F401


@triton.jit
def _trailing_update_kernel(
    c_ptr, p_ptr, pairs_ptr, n, kdim, stride_c, stride_p,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pair = tl.program_id(0)
    ti = tl.load(pairs_ptr + 2 * pair)
    tj = tl.load(pairs_ptr + 2 * pair + 1)
    rm = ti * BLOCK + tl.arange(0, BLOCK)
    rn = tj * BLOCK + tl.arange(0, BLOCK)
    m_ok = rm < n
    n_ok = rn < n
    acc = tl.zeros((BLOCK, BLOCK), dtype=c_ptr.dtype.element_ty)
    for k0 in range(0, kdim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < kdim
        a = tl.load(p_ptr + rm[:, None].to(tl.int64) * stride_p + ks[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(p_ptr + rn[:, None].to(tl.int64) * stride_p + ks[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_c + rn[None, :]
    c_mask = m_ok[:, None] & n_ok[None, :]
    tl.store(c_ptrs, tl.load(c_ptrs, mask=c_mask, other=0.0) - acc, mask=c_mask)


@functools.lru_cache(maxsize=64)
def _lower_pairs(n_tiles: int, device: torch.device) -> torch.Tensor:
    """(i, j) tile indices with i ≥ j, flattened int32."""
    return torch.tril_indices(n_tiles, n_tiles).T.contiguous().to(device=device, dtype=torch.int32).flatten()


def trailing_update(c: torch.Tensor, p: torch.Tensor, *, block: int | None = None, block_k: int | None = None) -> None:
    """c -= p·pᵀ on the lower-triangle tiles of the square ``c`` (in place; row stride free, unit column stride)."""
    n, kdim = p.shape
    if c.shape != (n, n) or c.dtype != p.dtype or c.stride(1) != 1:
        raise ValueError(f"trailing_update needs c ({n}, {n}) with unit column stride and p's dtype; got {tuple(c.shape)} {c.dtype}")
    if c.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"trailing_update works in float32 or float64, got {c.dtype}")
    if n == 0 or kdim == 0:
        return
    p = p.contiguous()
    blk = block or (16 if interpreting() else 64)
    blk_k = block_k or (16 if interpreting() else 32)
    pairs = _lower_pairs(triton.cdiv(n, blk), c.device)
    _trailing_update_kernel[(pairs.numel() // 2,)](
        c, p, pairs, n, kdim, c.stride(0), p.stride(0),
        BLOCK=blk, BLOCK_K=blk_k, PRECISION="ieee", num_warps=4,
    )


def cholesky_blocked(a: torch.Tensor, *, panel: int | None = None, block: int | None = None) -> tuple[torch.Tensor, int]:
    """(L, info) like torch.linalg.cholesky_ex: info = 0 on success, else the order of the first failing minor."""
    check_device(a)
    if a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"cholesky needs a square matrix, got {tuple(a.shape)}")
    n = a.shape[0]
    panel = panel or (32 if interpreting() else 256)
    w = a.clone()
    for k0 in range(0, n, panel):
        k1 = min(k0 + panel, n)
        blk = w[k0:k1, k0:k1]
        # The update wrote only lower tiles: rebuild the block from its lower triangle.
        blk = torch.tril(blk) + torch.tril(blk, diagonal=-1).T
        lkk, info = torch.linalg.cholesky_ex(blk)
        if int(info) != 0:
            return torch.tril(w), k0 + int(info)
        w[k0:k1, k0:k1] = lkk
        if k1 < n:
            # P = A21 · Lkk⁻ᵀ, i.e. P · Lkkᵀ = A21.
            p = torch.linalg.solve_triangular(lkk.T, w[k1:, k0:k1], upper=True, left=False)
            w[k1:, k0:k1] = p
            trailing_update(w[k1:, k1:], p, block=block)
    return torch.tril(w), 0


def cholesky_damped(
    H: torch.Tensor,
    rel_damp: float = 0.01,
    max_tries: int = 6,
    ladder: float = 10.0,
) -> tuple[torch.Tensor, float, int]:
    """Same contract as reference.cholesky_damped, factoring with :func:`cholesky_blocked`."""
    return damped_factorisation(H, rel_damp, max_tries, ladder, cholesky_blocked)
