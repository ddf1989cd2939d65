"""Top-k eigenpairs of a batch of symmetric PSD matrices of one width: restarted block Krylov, in torch.

Single-vector Lanczos (ARPACK) does one matrix-vector product at a time: a memory-bound
GEMV that leaves a multi-threaded BLAS waiting, once per group. Here every product is a GEMM
with a block of b vectors (one per matrix, in place), and everything between the products
(projections, QR, Rayleigh–Ritz) is batched over all the matrices of a width, so the work runs
at matrix-multiply speed on any thread count and on the GPU. One *cycle*, for each matrix A (d × d) and an
orthonormal start block Q₀ (d × b, b = k + oversampling):

1. Krylov basis V = [Q₀, Q₁, …, Q_q] of span{Q₀, AQ₀, …, A^q Q₀}: each new block is A·Q_j with
   every earlier block projected out and QR, twice (classical Gram–Schmidt loses orthogonality
   in fp32 after one pass; the second also repairs a direction that QR invented where the
   Krylov space is exhausted).
   Products in fp32: they carry the cost.
2. Rayleigh–Ritz: T = Vᵀ(AV) (the products AQ_j are kept, so T costs no further product),
   eigh(T), the top b Ritz vectors x_i = V y_i.
3. Refinement in fp64: the top b Ritz vectors are orthonormalised in fp64 and Rayleigh–Ritz
   is repeated with one fp64 product A·X. fp32 products limit the *subspace* to about
   fp32 precision; the fp64 step gives eigenvalues that are exact for that subspace, and
   residuals that are not hidden under fp32 rounding.
4. Acceptance per matrix: each of its top k pairs must have a residual r_i ≤ ``RESIDUAL_TOL`` · θ_i
   (the pair is exact for a matrix within that share of θ_i of A, and θ_i within it of an
   eigenvalue; fp32 products, whose rounding is relative to θ₁, cannot promise much less for
   the k-th pair) and r_i ≤ ``VECTOR_TOL`` · g_i, g_i the gap from θ_i to its nearest
   neighbouring Ritz value, which bounds the angle to the true eigenvector (Davis–Kahan:
   sin∠ ≤ r/g) and the eigenvalue error (r²/g ≤ 3e-6 · θ_i at the bounds).
   A matrix that fails restarts from its fp64 Ritz block (a thick restart), for at most
   ``MAX_CYCLES`` cycles and only while each cycle at least halves its distance from the check
   (``STALL``): fp32 products round at about 1e-7·θ₁, so a matrix whose θ₁ dwarfs its θ_k
   (beyond about 1e3) stalls above the check; it is returned as not accepted, and the caller
   solves it again with fp64 products (``products=torch.float64``), then, if that fails too,
   with a dense ``eigh``. Nearly repeated eigenvalues among the top k (g ≈ 0), a zero matrix
   (θ = 0) or a non-finite product fail the check: never out unconverged. Each matrix is judged
   on its own k. The gap is to the neighbouring *Ritz* values, an estimate of the true gap once
   the neighbours have converged.
   tests/test_init_block_krylov.py holds it to a dense fp64 ``eigh`` (eigenvalues to 1e-6 relative,
   signed cos ≥ 0.999) on drawn spectra and on SmolLM2-135M's real input covariances (k = 16).

Cost per cycle and matrix: (q + 1) products of d²·b multiply-adds in fp32, one in fp64, and
O(d·m²) for the basis (m = (q + 1)·b); SmolLM2-135M's covariances take one or two cycles. The
start block is seeded (one Gaussian d × b draw shared by every matrix), so one configuration
gives the same bytes on every run.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

OVERSAMPLE = 8  # extra Ritz vectors beyond k: they carry the gap at the k-th pair and speed convergence
DEPTH = 6  # Krylov blocks after the start block in one cycle
MAX_CYCLES = 6  # cycles (thick restarts) before a matrix is handed back unaccepted
STALL = 0.5  # ... or sooner, once a cycle no longer halves how far it is from the check
VECTOR_TOL = 3e-2  # accepted when ‖r_i‖ ≤ this × gap_i: sin∠ ≤ 0.03, |cos| ≥ 0.9995 against the exact vector
RESIDUAL_TOL = 1e-4  # ... and ‖r_i‖ ≤ this × θ_i: each pair exact for a matrix within 1e-4·θ_i of A


def block_size(d: int, k: int) -> int:
    """b: the k wanted pairs and the oversampled ones, at most d."""
    return min(d, k + max(OVERSAMPLE, k // 2))


def top_pairs(matrices: Sequence[torch.Tensor], ks: Sequence[int], *, seed: int = 0,
              products: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``ks[i]`` eigenpairs of each symmetric PSD matrix of ``matrices`` (all d × d, one device, fp64 or fp32).

    ``products``: the dtype of the Krylov products (fp32; fp64 for a matrix whose spread of eigenvalues puts
    fp32's rounding above the check). Returns ``(values, vectors, accepted)``: values (B, k) fp64 descending,
    vectors (B, d, k) fp64 in columns (signs not fixed), k = max(ks), accepted (B,) bool; matrix i is judged
    on its own ``ks[i]`` pairs, and one not accepted has zeros there.
    """
    batch, d = len(matrices), matrices[0].shape[0]
    device = matrices[0].device
    k = max(ks)
    b = block_size(d, k)
    depth = min(DEPTH, d // b - 1)
    values = torch.zeros(batch, k, dtype=torch.float64, device=device)
    vectors = torch.zeros(batch, d, k, dtype=torch.float64, device=device)
    accepted = torch.zeros(batch, dtype=torch.bool, device=device)
    if depth < 1 or k == 0:  # no room for a Krylov block beside the start block: the dense solver's case
        return values, vectors, accepted
    fast = [matrix.to(products) for matrix in matrices]  # a list: dropping a converged one copies nothing
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(b, d, generator=generator, dtype=torch.float64).to(device=device, dtype=products)
    rows = torch.linalg.qr(start.T)[0].T.expand(batch, b, d).contiguous()  # the start block, as rows
    active = list(range(batch))  # the matrices that fast and rows still stand for
    wanted = torch.tensor(list(ks), device=device)
    before = torch.full((batch,), float("inf"), dtype=torch.float64, device=device)
    for _ in range(MAX_CYCLES):
        theta, x, residual = _refine([matrices[i] for i in active], _krylov_ritz(fast, rows, depth, b))
        index = torch.tensor(active, device=device)
        excess = _excess(theta, residual, wanted[index])
        ok = excess <= 1.0
        done = index[ok]
        values[done], vectors[done], accepted[done] = theta[ok, :k], x[ok, :, :k], True
        # a matrix whose worst excess did not halve in a cycle has reached the floor its products' rounding
        # allows: more cycles would not pass the check (the caller retries it otherwise)
        going = ~ok & (excess < STALL * before[index])
        before[index] = excess
        if not bool(going.any()):
            break
        keep = going.tolist()
        active = [i for i, kept in zip(active, keep) if kept]
        fast = [a for a, kept in zip(fast, keep) if kept]
        rows = x[going].mT.to(products).contiguous()
    return values, vectors, accepted


def _project_out(basis: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The rows of ``w`` less their components in the row space of the orthonormal rows ``basis``."""
    return w - (w @ basis.mT) @ basis


def _orthonormal_rows(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(w.mT)[0].mT


def _krylov_ritz(a: list[torch.Tensor], rows: torch.Tensor, depth: int, b: int) -> torch.Tensor:
    """The top ``b`` Ritz vectors (B, d, b), fp64, of the Krylov space of depth ``depth`` started at ``rows``.

    The basis is kept as rows (B, m, d), so each block and each product A·V_j = (V_jᵀ A)ᵀ (A symmetric) is a
    contiguous (b, d) slice: the products are written in place, one GEMM per matrix."""
    batch, _, d = rows.shape
    m = (depth + 1) * b
    vt = rows.new_empty(batch, m, d)  # the basis, filled block by block
    avt = rows.new_empty(batch, m, d)  # its products with A
    vt[:, :b] = rows
    for j in range(depth + 1):
        lo, hi = j * b, (j + 1) * b
        for i, matrix in enumerate(a):
            torch.mm(vt[i, lo:hi], matrix, out=avt[i, lo:hi])
        if j == depth:
            break
        basis = vt[:, :hi]
        w = _orthonormal_rows(_project_out(basis, avt[:, lo:hi]))
        vt[:, hi:hi + b] = _orthonormal_rows(_project_out(basis, w))  # twice is enough (and repairs a direction
        # that QR invented for an exhausted Krylov space)
    v = vt.to(torch.float64)
    t = v @ avt.to(torch.float64).mT
    _, y = torch.linalg.eigh((t + t.mT) * 0.5)  # ascending
    return v.mT @ y[..., -b:].flip(-1)


def _refine(matrices: Sequence[torch.Tensor], ritz: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp64 Rayleigh–Ritz on span(``ritz``): (θ (B, b) descending, vectors (B, d, b), residual norms (B, b))."""
    x = torch.linalg.qr(ritz)[0]
    ax = torch.stack([m.to(torch.float64) @ xi for m, xi in zip(matrices, x)])  # fp64 products, one matrix at a time
    t = x.mT @ ax
    theta, y = torch.linalg.eigh((t + t.mT) * 0.5)
    theta, y = theta.flip(-1), y.flip(-1)
    vectors, products = x @ y, ax @ y
    residual = (products - vectors * theta[:, None, :]).norm(dim=1)
    return theta, vectors, residual


def _excess(theta: torch.Tensor, residual: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """(B,) how far each matrix's top ``ks[i]`` pairs are from the check: the largest of r_i / (RESIDUAL_TOL·θ_i)
    and r_i / (VECTOR_TOL·gap_i) over its pairs (≤ 1: accepted; inf: a pair with θ_i ≤ 0 or not finite)."""
    batch, b = theta.shape
    steps = theta[:, :-1] - theta[:, 1:]  # θ_i − θ_{i+1} ≥ 0
    inf = steps.new_full((batch, 1), float("inf"))
    gap = torch.minimum(torch.cat([inf, steps], dim=1), torch.cat([steps, inf], dim=1))
    ratio = torch.maximum(residual / (RESIDUAL_TOL * theta), residual / (VECTOR_TOL * gap))
    ratio = torch.where((theta > 0) & torch.isfinite(theta) & torch.isfinite(residual), ratio,
                        torch.full_like(ratio, float("inf")))
    wanted = torch.arange(b, device=theta.device)[None, :] < ks[:, None]
    return torch.where(wanted, ratio.nan_to_num(nan=float("inf")), torch.zeros_like(ratio)).max(dim=1).values
