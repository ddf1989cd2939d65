"""Every op of the op table, per CPU-side backend (reference, cpu), against fp64 oracles on fresh
random inputs; error cases; torch.library.opcheck of the compiled ops; the damping ladder.
accumulate_xtx, with its two cpu product paths and thread splits, is in test_ops_xtx.py.

GPU backends (cuda, triton) are tested in their own files with the helpers of ``oracles.py``.
"""
from __future__ import annotations

import os

import pytest
import torch

from oracles import (ACCUMULATION_RTOL, FLOAT_DTYPES, FP32_FACTOR_RTOL, FP64_RTOL, activation,
                     assert_factor_close, assert_sums_close, case_seed, floored, op_for, oracle_diag_stats,
                     oracle_sumsq, spd, token_mask, with_eigenvalues)
from sensitivity_lora import ops
from sensitivity_lora.errors import NotPositiveDefiniteError
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BACKENDS = ("reference", "cpu")


def native_op(name: str):
    """The compiled operator (for opcheck), or a skip."""
    op_for(name, "cpu")
    return getattr(torch.ops.sensitivity_lora, name).default


# --- accumulate_sumsq ---------------------------------------------------------------------------

SUMSQ_SHAPES = [(0, 17), (1, 1), (37, 5), (1000, 577), (5000, 300)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SUMSQ_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mask_kind", ["none", "random", "all-masked"])
def test_sumsq_matches_oracle(backend, dtype, shape, mask_kind):
    fn = op_for("accumulate_sumsq", backend)
    n, d = shape
    seed = case_seed("sumsq", dtype, shape, mask_kind)
    x = activation(n, d, dtype, seed)
    mask = token_mask(n, mask_kind, seed)
    # Accumulators start non-zero: the op must add, not overwrite.
    acc0 = torch.rand(d, dtype=torch.float64)
    sum0 = torch.randn(d, dtype=torch.float64)
    acc, acc_sum = acc0.clone(), sum0.clone()
    fn(acc, x, mask, acc_sum)
    sq, s = oracle_sumsq(x, mask)
    n_kept = n if mask is None else int(mask.sum())
    assert_sums_close(acc, acc0 + sq, acc0 + sq, ACCUMULATION_RTOL, "Σx²")
    assert_sums_close(acc_sum, sum0 + s, torch.sqrt(max(n_kept, 1) * sq) + sum0.abs(), ACCUMULATION_RTOL, "Σx")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["row-strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sumsq_non_contiguous(backend, layout, dtype):
    fn = op_for("accumulate_sumsq", backend)
    x = activation(700, 129, dtype, case_seed("sumsq-nc", layout, dtype), layout)
    assert not x.is_contiguous()
    mask = token_mask(700, "random", 3)
    acc = torch.zeros(129, dtype=torch.float64)
    fn(acc, x, mask)
    sq, _ = oracle_sumsq(x, mask)
    assert_sums_close(acc, sq, sq, ACCUMULATION_RTOL, "Σx² (non-contiguous)")
    # Strided accumulators are accepted too.
    wide = torch.zeros(129, 2, dtype=torch.float64)
    fn(wide[:, 1], x, mask)
    assert_sums_close(wide[:, 1], sq, sq, ACCUMULATION_RTOL, "Σx² into a strided accumulator")
    assert torch.equal(wide[:, 0], torch.zeros(129, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sumsq_integer_mask_and_no_sum(backend):
    fn = op_for("accumulate_sumsq", backend)
    x = activation(300, 40, torch.float32, 11)
    mask = token_mask(300, "random", 12)
    acc = torch.zeros(40, dtype=torch.float64)
    fn(acc, x, mask.long())
    sq, _ = oracle_sumsq(x, mask)
    assert_sums_close(acc, sq, sq, ACCUMULATION_RTOL, "Σx² with a 0/1 integer mask")


def test_sumsq_cpu_is_deterministic():
    fn = op_for("accumulate_sumsq", "cpu")
    x = activation(3000, 1000, torch.bfloat16, 5)
    a, b = torch.zeros(1000, dtype=torch.float64), torch.zeros(1000, dtype=torch.float64)
    fn(a, x)
    fn(b, x)
    assert torch.equal(a, b)


# --- errors of the accumulation ops -------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["accumulate_sumsq", "accumulate_xtx"])
def test_accumulate_rejects_bad_shapes(backend, name):
    fn = op_for(name, backend)
    d = 6
    acc = torch.zeros((d,) if name == "accumulate_sumsq" else (d, d), dtype=torch.float64)
    with pytest.raises(ValueError, match="tokens, d"):
        fn(acc, torch.randn(2, 3, d))
    with pytest.raises(ValueError, match="mask"):
        fn(acc, torch.randn(5, d), torch.ones(4, dtype=torch.bool))


# The reference does no dtype/shape checks of the accumulator (torch's add_ decides); the compiled
# backends promise clear ValueErrors.
@pytest.mark.parametrize("name", ["accumulate_sumsq", "accumulate_xtx"])
def test_accumulate_cpu_rejects_bad_accumulators(name):
    fn = op_for(name, "cpu")
    d = 6
    shape = (d,) if name == "accumulate_sumsq" else (d, d)
    x = torch.randn(5, d)
    with pytest.raises(ValueError, match="float64"):
        fn(torch.zeros(shape, dtype=torch.float32), x)
    with pytest.raises(ValueError, match="shape"):
        fn(torch.zeros(tuple(s + 1 for s in shape), dtype=torch.float64), x)
    with pytest.raises(ValueError, match="float64"):
        fn(torch.zeros(shape, dtype=torch.float64), x, None, torch.zeros(d, dtype=torch.float32))
    with pytest.raises(ValueError, match="not supported"):
        fn(torch.zeros(shape, dtype=torch.float64), torch.ones(5, d, dtype=torch.int32))


# --- diag_stats ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [1, 2, 7, 100, 513])
@pytest.mark.parametrize("d_out", [1, 3, 8])
@pytest.mark.parametrize("alpha", [0.5, 0.85, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_diag_stats_matches_oracle(backend, d, d_out, alpha, dtype):
    fn = op_for("diag_stats", backend)
    g = torch.Generator().manual_seed(case_seed("diag", d, d_out, alpha, dtype))
    diag = (torch.rand(d, generator=g, dtype=torch.float64) ** 3 * 10).to(dtype)  # skewed, like real H
    m = d * d_out
    for k in sorted({1, max(1, m // 2), m, min(m, 5)}):
        out = fn(diag, d_out, k, alpha)
        assert out.dtype == torch.float64 and out.shape == (3,)
        trace, topk, eff = oracle_diag_stats(diag, d_out, k, alpha)
        assert out[0].item() == pytest.approx(trace, rel=FP64_RTOL)
        assert out[1].item() == pytest.approx(topk, rel=FP64_RTOL)
        assert out[2].item() == eff, f"effective rank for k={k}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_diag_stats_exact_fractions_ties_and_zeros(backend):
    fn = op_for("diag_stats", backend)
    # Four equal entries, α = 1/2: exactly half the trace after 2 of them, per copy.
    assert fn(torch.ones(4, dtype=torch.float64), 3, 6, 0.5).tolist() == [12.0, 1.0, 6.0]
    # Ties across the top-k boundary and integer values.
    diag = torch.tensor([5.0, 3.0, 3.0, 3.0, 1.0, 0.0], dtype=torch.float64)
    for d_out, k, alpha in [(1, 3, 0.85), (2, 5, 0.6), (4, 13, 0.75)]:
        trace, topk, eff = oracle_diag_stats(diag, d_out, k, alpha)
        assert fn(diag, d_out, k, alpha).tolist() == [pytest.approx(trace), pytest.approx(topk), eff]
    # No curvature at all: effective rank 0.
    assert fn(torch.zeros(5), 2, 3, 0.85).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_diag_stats_large_matches_reference_closed_form(backend):
    # Sizes of real models (oracle too big to expand; the closed form is checked by the test above).
    fn = op_for("diag_stats", backend)
    from sensitivity_lora.ops import reference

    diag = torch.rand(14336, dtype=torch.float64) ** 4
    for d_out, k, alpha in [(4096, 14336 * 4096 // 2, 0.85), (1, 7168, 0.85), (576, 5, 0.99)]:
        out, ref = fn(diag, d_out, k, alpha), reference.diag_stats(diag, d_out, k, alpha)
        torch.testing.assert_close(out[:2], ref[:2], rtol=FP64_RTOL, atol=0)
        assert out[2].item() == ref[2].item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("args, match", [
    ((torch.zeros(0), 1, 1, 0.5), "non-empty"),
    ((torch.ones(3), 0, 1, 0.5), "d_out"),
    ((torch.ones(3), 2, 0, 0.5), "out of range"),
    ((torch.ones(3), 2, 7, 0.5), "out of range"),
    ((torch.ones(3), 2, 3, 0.0), "alpha"),
    ((torch.ones(3), 2, 3, 1.5), "alpha"),
])
def test_diag_stats_rejects_bad_arguments(backend, args, match):
    fn = op_for("diag_stats", backend)
    with pytest.raises(ValueError, match=match):
        fn(*args)


# --- cholesky_damped ----------------------------------------------------------------------------

def _ladder_oracle(H: torch.Tensor, rel_damp: float, ladder: float) -> tuple[torch.Tensor, float, int]:
    """(floored H, first damping that makes it PD, tries), from fp64 eigenvalues."""
    A, floor = floored(H)
    lam_min = float(torch.linalg.eigvalsh(A)[0])
    for attempt in range(100):
        damp = rel_damp * floor * ladder**attempt
        if lam_min + damp > 1e-6 * floor:
            return A, damp, attempt + 1
    raise AssertionError("oracle ladder did not end")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 5, 257, 600])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cholesky_spd(backend, n, dtype):
    fn = op_for("cholesky_damped", backend)
    H = spd(n, case_seed("spd", n), dtype)
    L, damp, tries = fn(H)
    A, floor = floored(H)
    assert L.dtype == dtype and L.shape == (n, n)
    assert tries == 1 and damp == pytest.approx(0.01 * floor, rel=1e-6)
    A.diagonal().add_(damp)
    assert_factor_close(L, A, FP64_RTOL if dtype == torch.float64 else FP32_FACTOR_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cholesky_singular_with_dead_features(backend):
    # Rank 40 of 300 and 20 dead (all-zero) features: the floor and the first damping fix it.
    fn = op_for("cholesky_damped", backend)
    x = activation(40, 300, torch.float64, 31)
    x[:, 100:120] = 0
    H = x.T @ x
    A, damp_expected, tries_expected = _ladder_oracle(H, 0.01, 10.0)
    L, damp, tries = fn(H)
    assert tries == tries_expected == 1
    assert damp == pytest.approx(damp_expected)
    assert bool((A.diagonal()[100:120] == floored(H)[1]).all()), "dead features get the floor"
    A.diagonal().add_(damp)
    assert_factor_close(L, A, 1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [6, 300])
def test_cholesky_indefinite_climbs_the_ladder(backend, n):
    # One eigenvalue at −0.3·mean(diag): needs δ > 0.3·mean, so 0.01 and 0.1 fail and 1.0 works.
    fn = op_for("cholesky_damped", backend)
    eig = torch.linspace(1.0, 3.0, n, dtype=torch.float64)
    eig[0] = -0.3 * float(eig[1:].mean())  # trace changes a little; the oracle reads mean(diag) from H
    H = with_eigenvalues(n, case_seed("indef", n), eig)
    A, damp_expected, tries_expected = _ladder_oracle(H, 0.01, 10.0)
    assert tries_expected == 3
    L, damp, tries = fn(H)
    assert tries == tries_expected and damp == pytest.approx(damp_expected)
    A.diagonal().add_(damp)
    assert_factor_close(L, A, 1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cholesky_exhausted_ladder_raises(backend):
    fn = op_for("cholesky_damped", backend)
    eig = torch.ones(50, dtype=torch.float64)
    eig[0] = -1000.0
    H = with_eigenvalues(50, 7, eig)
    with pytest.raises(NotPositiveDefiniteError, match=r"size 50 is not positive definite after damping with .*, .*mean diagonal"):
        fn(H, 0.01, 2, 10.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cholesky_errors(backend):
    fn = op_for("cholesky_damped", backend)
    H = spd(4, 1)
    H[1, 2] = float("nan")
    with pytest.raises(NotPositiveDefiniteError, match="non-finite"):
        fn(H)
    with pytest.raises(ValueError, match="square"):
        fn(torch.ones(3, 4, dtype=torch.float64))


# --- cholesky_inverse_diag ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 7, 300, 513])
def test_inverse_diag_matches_oracle(backend, n):
    fn = op_for("cholesky_inverse_diag", backend)
    H = spd(n, case_seed("inv", n))
    L = torch.linalg.cholesky(H)
    expected = torch.linalg.inv(H).diagonal()
    out = fn(L)
    assert out.dtype == torch.float64 and out.shape == (n,)
    assert_sums_close(out, expected, expected, 1e-9, "diag(H⁻¹)")


def test_inverse_diag_cpu_rejects_non_square():
    fn = op_for("cholesky_inverse_diag", "cpu")
    with pytest.raises(ValueError, match="square"):
        fn(torch.ones(3, 4, dtype=torch.float64))


# --- the compiled ops as torch operators ---------------------------------------------------------

def _opcheck_cases():
    x = activation(64, 24, torch.bfloat16, 2)
    mask = token_mask(64, "random", 2)
    H = spd(40, 3)
    return {
        "accumulate_sumsq": (torch.zeros(24, dtype=torch.float64), x, mask, torch.zeros(24, dtype=torch.float64)),
        "accumulate_xtx": (torch.zeros(24, 24, dtype=torch.float64), x, mask, torch.zeros(24, dtype=torch.float64)),
        "diag_stats": (torch.rand(30, dtype=torch.float64), 4, 50, 0.85),
        "cholesky_damped": (H, 0.01, 6, 10.0),
        "cholesky_inverse_diag": (torch.linalg.cholesky(H),),
    }


@pytest.mark.parametrize("name", ops.OP_NAMES)
def test_opcheck(name):
    op = native_op(name)
    torch.library.opcheck(op, _opcheck_cases()[name])


def test_native_registers_every_op_for_cpu():
    op_for("accumulate_sumsq", "cpu")
    missing = [name for name in ops.OP_NAMES if not ops.available(name, "cpu")]
    assert not missing, f"the extension is built but lacks CPU kernels for {missing}"
