"""Top-k eigenpairs of a symmetric positive semi-definite matrix, in a fixed sign convention.

Initialisers need only the top k = round(ρ·r̄) directions (16–32) of a d × d
covariance, d up to 14336. A dense ``torch.linalg.eigh`` is O(d³) whatever k is
(measured on one CPU thread: 0.05 s at d = 576, 0.8 s at 1536, 23 s at 4096).
Krylov methods need only products with the matrix. ARPACK's Lanczos (through
``scipy.sparse.linalg.eigsh``) does them one vector at a time, a memory-bound GEMV
that gains nothing from a second thread; the block solver does them a block at a
time for every group of a width, at GEMM speed. ``benchmarks/bench_end_to_end.py``
(SmolLM2's 120 groups) and ``benchmarks/bench_eigensolver.py`` (d = 4096 and 14336)
measure the three; ``auto`` follows them.

Solvers:

- ``block``: a restarted block Krylov method (:mod:`.block_krylov`) on the matrix's own device,
  fp32 products and fp64 Rayleigh–Ritz, for many matrices of one width at once
  (:func:`top_eigenpairs_many`): batched GEMMs instead of one matrix-vector product at a time,
  so it uses every torch thread and the GPU. Each answer is checked (every residual
  ‖S v − θ v‖ ≤ 1e-4 · θ and ≤ 0.03 × the gap to the neighbouring eigenvalues). fp32
  products round at about 1e-7 · θ₁, so a matrix whose top eigenvalue dwarfs its k-th
  (θ₁/θ_k beyond about 1e3) cannot pass with them: it is solved again with fp64 products
  (``block-fp64``), and one that fails that too (nearly repeated eigenvalues among the top
  k, a zero matrix) gets the dense answer. A matrix stops early once a cycle no longer
  halves its distance from the check.
- ``dense``: ``torch.linalg.eigh`` on the matrix's own device, all pairs, the top k kept.
- ``lanczos``: ARPACK on the CPU (a tensor on another device is copied there), a seeded
  start vector, relative tolerance ``tol``. Its answer is checked (every residual
  ‖S v − θ v‖ ≤ 1e-6 · θ₁) and replaced by the dense one if ARPACK did not converge or
  the check fails (or ARPACK refuses the matrix), so it never returns an unconverged pair. Like every single-vector
  Krylov method it could miss a copy of an eigenvalue that is repeated *exactly* among
  the top k, which calibration statistics do not have.
- ``auto``: for d ≥ 256 and k ≤ d/4, ``block`` on a GPU and on a CPU with two or more torch
  threads, ``lanczos`` on one CPU thread (where its one-vector products cost less than the block
  solver's extra work); else ``dense``.

Conventions, whatever the solver:

- eigenvalues descending, eigenvectors as the *rows* of a (k, d) tensor (LoRA's A layout);
- sign: each vector is flipped so that its largest-magnitude entry is positive (the first
  such entry on exact ties), so results do not depend on the solver, the BLAS or the
  thread count beyond rounding. PEFT's IncrementalPCA flips its components the same way;
- fp64 results; the start vectors are seeded, so two runs give the same bytes.

Threads: ``block`` and ``dense`` run in torch's intra-op threads (``torch.set_num_threads``);
ARPACK runs in scipy's BLAS, whose thread count follows ``OMP_NUM_THREADS`` /
``OPENBLAS_NUM_THREADS``, and does one product at a time, so it gains nothing from a second thread.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import block_krylov

METHODS = ("auto", "block", "dense", "lanczos")

# "auto" uses the block solver from this size on; below it a dense eigh takes well under 10 ms.
AUTO_ITERATIVE_MIN_DIM = 256
# ... and only while k is a small share of d (a Krylov space of several blocks of k must fit in d).
AUTO_ITERATIVE_MAX_SHARE = 0.25
# the block solver stacks fp32 copies of the matrices of one width up to this many bytes per batch
BLOCK_BATCH_BYTES = 256 * 2**20
# the check on a Lanczos answer: every residual within this share of the largest eigenvalue
LANCZOS_RESIDUAL_CHECK = 1e-6


@dataclass(frozen=True)
class Eigenpairs:
    """The top-k eigenpairs: ``values`` (k,) descending, ``vectors`` (k, d) rows, fp64."""

    values: torch.Tensor
    vectors: torch.Tensor
    method: str  # the solver that produced them: "block" (fp32 products), "block-fp64", "dense" or "lanczos"


def fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its largest-|.| entry is positive (first index on ties); returns a new tensor."""
    if vectors.ndim != 2:
        raise ValueError(f"expected a (k, d) tensor of row vectors, got shape {tuple(vectors.shape)}")
    if vectors.shape[0] == 0:
        return vectors.clone()
    pivots = vectors.abs().argmax(dim=1)  # torch.argmax returns the first maximal index: the tie rule
    signs = torch.sign(vectors.gather(1, pivots[:, None]))
    signs[signs == 0] = 1.0  # an all-zero row stays as it is
    return vectors * signs


def choose_method(d: int, k: int, device: torch.device | str = "cpu", threads: int | None = None) -> str:
    """The solver ``auto`` picks for a d × d matrix, k pairs, on ``device`` with ``threads`` torch threads
    (default: torch's count now). On one CPU thread ARPACK's one-vector products cost less than the block
    solver's extra work (measured on SmolLM2's 120 groups: 6.5 s against 8.0 s); from two threads on, and on
    a GPU, the block solver's GEMMs win (5.9 s against 7.9 s at two threads): benchmarks/RESULTS.md."""
    if d < AUTO_ITERATIVE_MIN_DIM or k > AUTO_ITERATIVE_MAX_SHARE * d:
        return "dense"
    threads = torch.get_num_threads() if threads is None else threads
    if torch.device(device).type == "cpu" and threads == 1 and k < d - 1:
        return "lanczos"
    return "block"


def top_eigenpairs(matrix: torch.Tensor, k: int, method: str = "auto", *, tol: float = 1e-10,
                   seed: int = 0) -> Eigenpairs:
    """Top ``k`` eigenpairs of the symmetric PSD ``matrix`` (computed in fp64), descending, sign-fixed.

    ``method``: "block", "dense", "lanczos" or "auto" (see the module doc); ``tol`` is ARPACK's
    relative tolerance, ``seed`` the start vectors'. The result is on the matrix's device.
    """
    _check(matrix, k, method)
    return _solve([matrix], [k], method, tol, seed)[0]


def top_eigenpairs_many(matrices: Sequence[torch.Tensor], ks: Sequence[int], method: str = "auto", *,
                        seed: int = 0) -> list[Eigenpairs]:
    """:func:`top_eigenpairs` of every matrix (``ks[i]`` pairs of ``matrices[i]``), in order.

    The ``block`` solver (``auto``'s choice for most) takes the matrices of one width and device
    together, in batches of ``BLOCK_BATCH_BYTES`` of fp32 copies (at least one matrix each); the others
    go one by one.
    """
    if len(matrices) != len(ks):
        raise ValueError(f"{len(matrices)} matrices but {len(ks)} values of k; give one k per matrix")
    for matrix, k in zip(matrices, ks):
        _check(matrix, k, method)
    return _solve(matrices, ks, method, 1e-10, seed)


def _solve(matrices: Sequence[torch.Tensor], ks: Sequence[int], method: str, tol: float,
           seed: int) -> list[Eigenpairs]:
    """The checked matrices' answers, in order: the block solver's by width and device, the others one by one."""
    results: list[Eigenpairs | None] = [None] * len(matrices)
    together: dict[tuple, list[int]] = {}
    for i, (matrix, k) in enumerate(zip(matrices, ks)):
        chosen = choose_method(matrix.shape[0], k, matrix.device) if method == "auto" else method
        if chosen == "block" and k > 0:
            together.setdefault((matrix.shape[0], str(matrix.device)), []).append(i)
            continue
        a = matrix.to(torch.float64)
        if k == 0:
            results[i] = Eigenpairs(a.new_zeros(0), a.new_zeros(0, a.shape[0]), "dense")
        elif chosen == "lanczos" and k < a.shape[0] - 1:
            results[i] = _lanczos(a, k, tol, seed) or _dense(a, k)
        else:
            results[i] = _dense(a, k)
    for (d, _), members in together.items():
        for batch in memory_batches(members, d * d * 4, BLOCK_BATCH_BYTES):
            _solve_block(matrices, ks, batch, seed, results)
    return results  # type: ignore[return-value]


def _solve_block(matrices: Sequence[torch.Tensor], ks: Sequence[int], batch: list[int], seed: int,
                 results: list) -> None:
    """fp32 products first; a matrix whose eigenvalue spread puts their rounding above the check gets fp64
    products, and one that fails those too the dense answer. Writes ``results[i]`` for every i in ``batch``."""
    left = batch
    for products, label in ((torch.float32, "block"), (torch.float64, "block-fp64")):
        values, vectors, accepted = block_krylov.top_pairs([matrices[i] for i in left], [ks[i] for i in left],
                                                           seed=seed, products=products)
        for j, i in enumerate(left):
            if bool(accepted[j]):
                rows = vectors[j, :, : ks[i]].T.contiguous()
                results[i] = Eigenpairs(values[j, : ks[i]].clone(), fix_signs(rows), label)
        left = [i for i in left if results[i] is None]
        if not left:
            return
    for i in left:
        results[i] = _dense(matrices[i].to(torch.float64), ks[i])


def memory_batches(items: Sequence, item_bytes: int, budget: int) -> list[list]:
    """``items`` in order, cut into runs of at most ``budget // item_bytes`` (at least one each)."""
    size = max(1, budget // max(1, item_bytes))
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def _check(matrix: torch.Tensor, k: int, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown eigen solver {method!r}; choose from {', '.join(METHODS)}")
    if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        shape = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
        raise ValueError(f"expected a square matrix tensor, got {shape}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= matrix.shape[0]:
        raise ValueError(f"k must be an integer between 0 and the matrix size {matrix.shape[0]}, got {k!r}")
    if not torch.isfinite(matrix).all():
        raise ValueError("the matrix has NaN or infinite entries; check the calibration statistics")


def _dense(a: torch.Tensor, k: int) -> Eigenpairs:
    values, vectors = torch.linalg.eigh(a)  # ascending, eigenvectors in columns
    top = torch.arange(a.shape[0] - 1, a.shape[0] - 1 - k, -1, device=a.device)
    return Eigenpairs(values[top].clone(), fix_signs(vectors[:, top].T.contiguous()), "dense")


def _lanczos(a: torch.Tensor, k: int, tol: float, seed: int) -> Eigenpairs | None:
    import numpy as np
    from scipy.sparse.linalg import ArpackError, eigsh

    host = a.detach().cpu().contiguous()
    d = host.shape[0]
    start = np.random.default_rng(seed).standard_normal(d)
    try:
        values, vectors = eigsh(host.numpy(), k=k, which="LA", tol=tol, v0=start, ncv=min(d, max(2 * k + 1, 20)))
    except ArpackError:  # no convergence, or a degenerate case such as the zero matrix: dense answers
        return None
    order = np.argsort(-values, kind="stable")
    theta = torch.from_numpy(np.ascontiguousarray(values[order]))
    rows = torch.from_numpy(np.ascontiguousarray(vectors[:, order].T))
    scale = float(theta[0])
    residual = (host @ rows.T - rows.T * theta).norm(dim=0)
    if scale <= 0.0 or float(residual.max()) > LANCZOS_RESIDUAL_CHECK * scale:
        return None
    return Eigenpairs(theta.to(a.device), fix_signs(rows).to(a.device), "lanczos")
