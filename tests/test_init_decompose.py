"""Top-k eigen solvers (dense, Lanczos) against a dense fp64 oracle, and the sign convention.

The block solver, and its batches of many matrices, have their own file (test_init_block_krylov.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sensitivity_lora.init import decompose
from sensitivity_lora.init.decompose import choose_method, fix_signs, top_eigenpairs


def decaying_matrix(d: int, decay: float, seed: int = 0, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Q diag(λ) Qᵀ with λ_i = i^-decay (the last d - rank set to 0 when ``rank``); returns (matrix, λ)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    lam = torch.arange(1, d + 1, dtype=torch.float64) ** -decay
    if rank is not None:
        lam[rank:] = 0.0
    return (q * lam) @ q.T, lam


def oracle(matrix: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy's fp64 eigh (a LAPACK independent of torch's), top k descending, rows, signs fixed the same way."""
    values, vectors = np.linalg.eigh(matrix.numpy())
    values, rows = values[::-1][:k], vectors[:, ::-1][:, :k].T
    pivots = np.abs(rows).argmax(axis=1)
    return values.copy(), rows * np.sign(rows[np.arange(k), pivots])[:, None]


@pytest.mark.parametrize("method", ["dense", "lanczos"])
@pytest.mark.parametrize("d,k,decay", [(300, 16, 0.5), (300, 32, 1.0), (640, 24, 2.0), (257, 16, 0.3)])
def test_solver_matches_fp64_oracle(method, d, k, decay):
    torch.set_num_threads(1)
    matrix, lam = decaying_matrix(d, decay, seed=d + k)
    values, rows = oracle(matrix, k)
    got = top_eigenpairs(matrix, k, method)
    assert got.method == method
    assert got.values.dtype == got.vectors.dtype == torch.float64
    assert got.vectors.shape == (k, d)
    np.testing.assert_allclose(got.values.numpy(), values, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(got.values.numpy(), lam[:k].numpy(), rtol=1e-9)
    # same vectors, same signs (not just |cos|): the sign convention makes them comparable entry by entry
    np.testing.assert_allclose(got.vectors.numpy(), rows, atol=1e-8)
    assert torch.all(got.values[:-1] >= got.values[1:])


def test_rank_deficient_matrix_top_pairs_still_exact():
    matrix, lam = decaying_matrix(400, 1.0, seed=3, rank=40)  # like fewer tokens than features
    values, rows = oracle(matrix, 32)
    got = top_eigenpairs(matrix, 32, "lanczos")
    np.testing.assert_allclose(got.values.numpy(), values, rtol=1e-10)
    np.testing.assert_allclose(got.vectors.numpy(), rows, atol=1e-8)


def test_two_runs_give_identical_bytes():
    matrix, _ = decaying_matrix(300, 1.0, seed=5)
    for method in ("dense", "lanczos"):
        a, b = top_eigenpairs(matrix, 16, method), top_eigenpairs(matrix, 16, method)
        assert torch.equal(a.vectors, b.vectors) and torch.equal(a.values, b.values)


def test_signs_do_not_depend_on_the_solver_or_the_input_sign_of_vectors():
    matrix, _ = decaying_matrix(300, 1.0, seed=6)
    dense, lanczos = top_eigenpairs(matrix, 16, "dense"), top_eigenpairs(matrix, 16, "lanczos")
    pivots = dense.vectors.abs().argmax(dim=1)
    assert torch.all(dense.vectors[torch.arange(16), pivots] > 0)
    assert torch.allclose(dense.vectors, lanczos.vectors, atol=1e-8)
    flipped = dense.vectors * torch.tensor([(-1.0) ** i for i in range(16)], dtype=torch.float64)[:, None]
    assert torch.equal(fix_signs(flipped), dense.vectors)


def test_fix_signs_ties_go_to_the_first_index():
    rows = torch.tensor([[-0.5, 0.5, 0.1], [0.5, -0.5, 0.1], [0.0, 0.0, 0.0]], dtype=torch.float64)
    fixed = fix_signs(rows)
    assert fixed[0].tolist() == [0.5, -0.5, -0.1]  # first of the two |0.5| entries made positive
    assert fixed[1].tolist() == [0.5, -0.5, 0.1]
    assert fixed[2].tolist() == [0.0, 0.0, 0.0]  # a zero row stays zero


def test_auto_choice_and_fallbacks(monkeypatch):
    assert choose_method(128, 16) == "dense"  # small: dense is already microseconds
    assert choose_method(576, 16, threads=2) == "block"
    assert choose_method(576, 16, threads=1) == "lanczos"  # one CPU thread: ARPACK's GEMVs cost less
    assert choose_method(576, 200, threads=2) == "dense"  # k a large share of d
    assert choose_method(4096, 32, "cuda", threads=1) == "block"
    matrix, _ = decaying_matrix(300, 1.0, seed=7)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert top_eigenpairs(matrix, 16).method == "lanczos"
        torch.set_num_threads(2)
        assert top_eigenpairs(matrix, 16).method == "block"
    finally:
        torch.set_num_threads(before)
    assert top_eigenpairs(matrix, 299, "lanczos").method == "dense"  # ARPACK needs k < d - 1
    # an unconverged or wrong Lanczos answer is replaced by the dense one
    monkeypatch.setattr(decompose, "LANCZOS_RESIDUAL_CHECK", -1.0)
    assert top_eigenpairs(matrix, 16, "lanczos").method == "dense"


def test_zero_matrix_and_k_zero():
    zero = torch.zeros(300, 300, dtype=torch.float64)
    got = top_eigenpairs(zero, 4, "lanczos")
    assert got.method == "dense" and torch.all(got.values == 0)
    empty = top_eigenpairs(zero, 0)
    assert empty.values.shape == (0,) and empty.vectors.shape == (0, 300)


def test_fp32_input_is_decomposed_in_fp64():
    matrix, _ = decaying_matrix(64, 1.0, seed=8)
    got = top_eigenpairs(matrix.float(), 4)
    assert got.vectors.dtype == torch.float64


@pytest.mark.parametrize("bad,k,method,match", [
    (torch.zeros(3, 4), 1, "auto", "square"),
    (torch.zeros(4, 4), 5, "auto", "between 0"),
    (torch.zeros(4, 4), 1, "qr", "unknown eigen solver"),
    (torch.full((4, 4), float("nan")), 1, "auto", "NaN"),
])
def test_bad_input_is_named(bad, k, method, match):
    with pytest.raises(ValueError, match=match):
        top_eigenpairs(bad, k, method)
