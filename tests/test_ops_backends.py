"""Every op of the op table on the compiled backends — ``cpu``, ``cuda``, ``triton`` — against the
independent fp64 oracles of ``oracles.py``, with the same cases for every backend.

- ``cpu`` runs on CPU tensors; ``cuda`` and ``triton`` on CUDA tensors (the oracle sees the same
  rounded values, copied back to the CPU). Inputs are drawn fresh each run: a session salt (printed
  in the header and in every failure; fix it with ``SL_TEST_SEED=N``) mixed with the case's name.
- A backend that is missing here (no CUDA device, extension built without CUDA, triton not
  installed, or the backend does not implement the op) is skipped with the reason; no other
  backend is ever substituted.
- Bounds per dtype: fp32 accumulation of inputs exact in fp32 stays within ``ACCUMULATION_RTOL``
  of each entry's Cauchy-Schwarz scale; fp32/fp64 activations on the GPU backends go through
  cuBLAS fp32 (cuda) or 3xTF32 tensor cores (triton) and get 4x that; fp64 selection and
  fp64 factorisations ``FP64_RTOL``; fp32 factorisations ``FP32_FACTOR_RTOL``.

CPU smoke of the triton cases (no GPU): ``TRITON_INTERPRET=1 SL_TRITON_ON_CPU=1 pytest
tests/test_ops_backends.py -k triton`` runs them in the Triton interpreter on CPU tensors, with
the small shapes only (the interpreter is slow). Nothing else changes device.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

import sensitivity_lora
from oracles import (ACCUMULATION_RTOL, FLOAT_DTYPES, FP32_FACTOR_RTOL, FP64_RTOL, activation,
                     assert_factor_close, assert_gram_close, assert_sums_close, case_seed, floored,
                     oracle_diag_stats, oracle_sumsq, oracle_xtx, spd, token_mask, with_eigenvalues)
from sensitivity_lora import ops

# The Triton interpreter on CPU tensors, opted into explicitly (the interpreter must be on
# before triton defines the kernels, so it is a property of the whole process).
TRITON_ON_CPU = os.environ.get("SL_TRITON_ON_CPU") == "1" and os.environ.get("TRITON_INTERPRET") == "1"
SMALL_ONLY = TRITON_ON_CPU

SALT = int(os.environ["SL_TEST_SEED"]) if os.environ.get("SL_TEST_SEED") else int.from_bytes(os.urandom(4), "little")

BACKENDS = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.gpu),
    pytest.param("triton", marks=pytest.mark.gpu),
]
GPU_FP32_FACTOR = 4.0  # fp32/fp64 activations on cuda (cuBLAS fp32) and triton (3xTF32)


def device_of(backend: str) -> torch.device:
    if backend == "cpu" or (backend == "triton" and TRITON_ON_CPU):
        return torch.device("cpu")
    return torch.device("cuda")


def implementation(op: str, backend: str):
    """(the backend's own implementation of ``op``, the device its tensors live on), or a skip."""
    device = device_of(backend)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{backend}: no CUDA device here (the {backend} backend runs on CUDA tensors)")
    if not ops.available(op, backend):
        pytest.skip(f"{backend} backend has no {op} here: {ops.unavailable_reason(op, backend)}")
    return ops.get_op(op, device, backend), device


def seed_of(*parts) -> int:
    return case_seed(SALT, *parts)


@contextlib.contextmanager
def seeded(seed: int):
    """Name the inputs' seed in any assertion failure."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{exc} [inputs: salt {SALT}, case seed {seed}]") from exc


def to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A copy of ``t`` on ``device`` with the same strides (a non-contiguous view stays
    non-contiguous; the caller's tensor is never written)."""
    if t is None:
        return None
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
    out.copy_(t)
    return out


def accumulation_rtol(backend: str, dtype: torch.dtype, op: str) -> float:
    if op == "xtx" and backend in ("cuda", "triton") and dtype in (torch.float32, torch.float64):
        return GPU_FP32_FACTOR * ACCUMULATION_RTOL
    return ACCUMULATION_RTOL


def shapes(small: list, large: list) -> list:
    return small if SMALL_ONLY else small + large


# --- accumulate_sumsq -----------------------------------------------------------------------------

SUMSQ_SHAPES = shapes([(0, 17), (1, 1), (37, 5), (300, 37)], [(1000, 577), (5000, 300), (9000, 1030)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SUMSQ_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mask_kind", ["none", "random", "all-masked", "none-masked"])
def test_sumsq_matches_oracle(backend, dtype, shape, mask_kind):
    fn, dev = implementation("accumulate_sumsq", backend)
    n, d = shape
    seed = seed_of("sumsq", dtype, shape, mask_kind)
    x = activation(n, d, dtype, seed)
    mask = token_mask(n, mask_kind, seed)
    g = torch.Generator().manual_seed(seed + 1)
    acc0 = torch.rand(d, generator=g, dtype=torch.float64)  # non-zero: the op must add, not overwrite
    sum0 = torch.randn(d, generator=g, dtype=torch.float64)
    acc, acc_sum = to(acc0, dev), to(sum0, dev)
    fn(acc, to(x, dev), to(mask, dev), acc_sum)
    assert acc.device.type == dev.type and acc.dtype == torch.float64
    sq, s = oracle_sumsq(x, mask)
    n_kept = n if mask is None else int(mask.sum())
    rtol = accumulation_rtol(backend, dtype, "sumsq")
    with seeded(seed):
        assert_sums_close(acc.cpu(), acc0 + sq, acc0 + sq, rtol, f"{backend} Σx²")
        assert_sums_close(acc_sum.cpu(), sum0 + s, torch.sqrt(max(n_kept, 1) * sq) + sum0.abs(), rtol,
                          f"{backend} Σx")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["row-strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sumsq_non_contiguous_and_integer_mask(backend, layout, dtype):
    fn, dev = implementation("accumulate_sumsq", backend)
    n, d = (129, 45) if SMALL_ONLY else (700, 129)
    seed = seed_of("sumsq-nc", layout, dtype)
    x = activation(n, d, dtype, seed, layout)
    assert not x.is_contiguous()
    mask = token_mask(n, "random", seed)
    acc = torch.zeros(d, dtype=torch.float64, device=dev)
    fn(acc, to(x, dev), to(mask.long(), dev))  # a 0/1 integer mask selects like a bool one
    sq, _ = oracle_sumsq(x, mask)
    with seeded(seed):
        assert_sums_close(acc.cpu(), sq, sq, ACCUMULATION_RTOL, f"{backend} Σx² ({layout}, integer mask)")


# --- accumulate_xtx -------------------------------------------------------------------------------

XTX_SHAPES = shapes([(0, 9), (1, 1), (45, 17), (300, 37)], [(777, 257), (5000, 300), (9000, 1030)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", XTX_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mask_kind", ["none", "random", "all-masked"])
def test_xtx_matches_oracle(backend, dtype, shape, mask_kind):
    fn, dev = implementation("accumulate_xtx", backend)
    n, d = shape
    seed = seed_of("xtx", dtype, shape, mask_kind)
    x = activation(n, d, dtype, seed)
    mask = token_mask(n, mask_kind, seed)
    g = torch.Generator().manual_seed(seed + 1)
    acc0 = torch.rand(d, d, generator=g, dtype=torch.float64)
    diag0 = torch.rand(d, generator=g, dtype=torch.float64)
    acc, diag = to(acc0, dev), to(diag0, dev)
    fn(acc, to(x, dev), to(mask, dev), diag)
    assert acc.device.type == dev.type and acc.dtype == torch.float64
    got = acc.cpu() - acc0
    expected = oracle_xtx(x, mask)
    sq, _ = oracle_sumsq(x, mask)
    rtol = accumulation_rtol(backend, dtype, "xtx")
    with seeded(seed):
        if d and n and (mask is None or bool(mask.any())):
            assert_gram_close(got, expected, rtol)
        else:  # nothing kept: the upper triangle is unchanged
            assert torch.equal(acc.cpu().triu(), acc0.triu()), f"{backend}: an empty input changed acc"
        assert_sums_close(diag.cpu(), diag0 + sq, diag0 + sq, ACCUMULATION_RTOL, f"{backend} diag (Σx²)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["row-strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_xtx_non_contiguous_and_integer_mask(backend, layout, dtype):
    fn, dev = implementation("accumulate_xtx", backend)
    n, d = (100, 33) if SMALL_ONLY else (4500, 200)
    seed = seed_of("xtx-nc", layout, dtype)
    x = activation(n, d, dtype, seed, layout)
    assert not x.is_contiguous()
    mask = token_mask(n, "random", seed)
    acc = torch.zeros(d, d, dtype=torch.float64, device=dev)
    fn(acc, to(x, dev), to(mask.long(), dev))
    with seeded(seed):
        assert_gram_close(acc.cpu(), oracle_xtx(x, mask), accumulation_rtol(backend, dtype, "xtx"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["accumulate_sumsq", "accumulate_xtx"])
def test_accumulate_rejects_bad_shapes(backend, name):
    fn, dev = implementation(name, backend)
    d = 6
    acc = torch.zeros((d,) if name == "accumulate_sumsq" else (d, d), dtype=torch.float64, device=dev)
    with pytest.raises(ValueError, match="tokens, d"):
        fn(acc, torch.randn(2, 3, d, device=dev))
    with pytest.raises(ValueError, match="mask"):
        fn(acc, torch.randn(5, d, device=dev), torch.ones(4, dtype=torch.bool, device=dev))


# --- diag_stats -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [1, 2, 7, 100, 513])
@pytest.mark.parametrize("d_out", [1, 3, 8])
@pytest.mark.parametrize("alpha", [0.5, 0.85, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_diag_stats_matches_oracle(backend, d, d_out, alpha, dtype):
    fn, dev = implementation("diag_stats", backend)
    seed = seed_of("diag", d, d_out, alpha, dtype)
    g = torch.Generator().manual_seed(seed)
    # Skewed, like real H. Entries stay above 1e-12 of the trace: at α = 1 a tail below that is
    # inside the selection's relative tolerance, where the oracle (per copy) and the closed form
    # (per distinct entry) may legitimately differ by a copy.
    diag = (torch.rand(d, generator=g, dtype=torch.float64) ** 3 * 10).clamp_min(1e-6).to(dtype)
    m = d * d_out
    for k in sorted({1, max(1, m // 2), m, min(m, 5)}):
        out = fn(to(diag, dev), d_out, k, alpha)
        assert out.dtype == torch.float64 and out.shape == (3,)
        trace, topk, eff = oracle_diag_stats(diag, d_out, k, alpha)
        got = out.cpu().tolist()
        with seeded(seed):
            assert got[0] == pytest.approx(trace, rel=FP64_RTOL), f"{backend} trace, k={k}"
            assert got[1] == pytest.approx(topk, rel=FP64_RTOL), f"{backend} top-k mean, k={k}"
            assert got[2] == eff, f"{backend} effective rank, k={k}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_diag_stats_ties_zeros_and_massive(backend):
    fn, dev = implementation("diag_stats", backend)
    # Four equal entries, α = 1/2: exactly half the trace after 2 of them, per copy.
    assert fn(torch.ones(4, dtype=torch.float64, device=dev), 3, 6, 0.5).cpu().tolist() == [12.0, 1.0, 6.0]
    diag = torch.tensor([5.0, 3.0, 3.0, 3.0, 1.0, 0.0], dtype=torch.float64)
    for d_out, k, alpha in [(1, 3, 0.85), (2, 5, 0.6), (4, 13, 0.75)]:
        trace, topk, eff = oracle_diag_stats(diag, d_out, k, alpha)
        assert fn(to(diag, dev), d_out, k, alpha).cpu().tolist() == [pytest.approx(trace), pytest.approx(topk), eff]
    assert fn(torch.zeros(5, device=dev), 2, 3, 0.85).cpu().tolist() == [0.0, 0.0, 0.0]
    massive = (torch.rand(30, generator=torch.Generator().manual_seed(seed_of("massive")), dtype=torch.float64) ** 3
               ).clamp_min(1e-4)  # tail above the selection's tolerance (see test_diag_stats_matches_oracle)
    massive[:2] *= 1000.0
    for d_out, k, alpha in [(7, 209, 0.3), (7, 1, 0.99), (1, 30, 1.0)]:
        trace, topk, eff = oracle_diag_stats(massive, d_out, k, alpha)
        got = fn(to(massive, dev), d_out, k, alpha).cpu().tolist()
        assert got[:2] == [pytest.approx(trace, rel=FP64_RTOL), pytest.approx(topk, rel=FP64_RTOL)]
        assert got[2] == eff


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d, d_out", [(4096, 2), (14336, 1)] if not SMALL_ONLY else [(300, 2)])
def test_diag_stats_model_widths(backend, d, d_out):
    # LLaMA-3.1-8B input widths, still small enough for the explicit oracle.
    fn, dev = implementation("diag_stats", backend)
    seed = seed_of("diag-wide", d, d_out)
    diag = (torch.rand(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) ** 4).clamp_min(1e-6)
    m = d * d_out
    for k, alpha in [(m // 2, 0.85), (7, 0.85), (5, 0.99), (m, 1.0)]:
        trace, topk, eff = oracle_diag_stats(diag, d_out, k, alpha)
        got = fn(to(diag, dev), d_out, k, alpha).cpu().tolist()
        with seeded(seed):
            assert got[:2] == [pytest.approx(trace, rel=FP64_RTOL), pytest.approx(topk, rel=FP64_RTOL)], f"k={k}"
            assert got[2] == eff, f"{backend} effective rank, k={k}, alpha={alpha}"


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
    fn, dev = implementation("diag_stats", backend)
    with pytest.raises(ValueError, match=match):
        fn(to(args[0], dev), *args[1:])


# --- cholesky_damped ------------------------------------------------------------------------------

def ladder_oracle(H: torch.Tensor, rel_damp: float = 0.01, ladder: float = 10.0) -> tuple[torch.Tensor, float, int]:
    """(floored H, first damping on the ladder that makes it PD, tries), from fp64 eigenvalues."""
    A, floor = floored(H)
    lam_min = float(torch.linalg.eigvalsh(A)[0])
    for attempt in range(100):
        damp = rel_damp * floor * ladder**attempt
        if lam_min + damp > 1e-6 * floor:
            return A, damp, attempt + 1
    raise AssertionError("oracle ladder did not end")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", shapes([1, 5, 37, 70], [257, 600, 1030]))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cholesky_spd(backend, n, dtype):
    fn, dev = implementation("cholesky_damped", backend)
    seed = seed_of("spd", n, dtype)
    H = spd(n, seed, dtype)
    L, damp, tries = fn(to(H, dev))
    assert L.dtype == dtype and L.shape == (n, n) and L.device.type == dev.type
    A, floor = floored(H)
    with seeded(seed):
        assert tries == 1 and damp == pytest.approx(0.01 * floor, rel=1e-6)
        A.diagonal().add_(damp)
        assert_factor_close(L.cpu(), A, FP64_RTOL if dtype == torch.float64 else FP32_FACTOR_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cholesky_singular_with_dead_features(backend):
    # Rank 40 of n and 20 dead (all-zero) features: the floor and the first damping fix it.
    fn, dev = implementation("cholesky_damped", backend)
    n = 60 if SMALL_ONLY else 300
    seed = seed_of("singular", n)
    x = activation(40, n, torch.float64, seed)
    x[:, 10:30] = 0
    H = x.T @ x
    A, damp_expected, tries_expected = ladder_oracle(H)
    L, damp, tries = fn(to(H, dev))
    with seeded(seed):
        assert tries == tries_expected == 1
        assert damp == pytest.approx(damp_expected)
        A.diagonal().add_(damp)
        assert_factor_close(L.cpu(), A, 1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", shapes([6, 40], [300]))
def test_cholesky_indefinite_climbs_the_ladder(backend, n):
    # One eigenvalue at −0.3·mean: 0.01 and 0.1 of the mean diagonal fail, 1.0 works.
    fn, dev = implementation("cholesky_damped", backend)
    seed = seed_of("indef", n)
    eig = torch.linspace(1.0, 3.0, n, dtype=torch.float64)
    eig[0] = -0.3 * float(eig[1:].mean())
    H = with_eigenvalues(n, seed, eig)
    A, damp_expected, tries_expected = ladder_oracle(H)
    assert tries_expected == 3
    L, damp, tries = fn(to(H, dev))
    with seeded(seed):
        assert tries == tries_expected and damp == pytest.approx(damp_expected)
        A.diagonal().add_(damp)
        assert_factor_close(L.cpu(), A, 1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cholesky_exhausted_ladder_and_non_finite_raise(backend):
    fn, dev = implementation("cholesky_damped", backend)
    eig = torch.ones(50, dtype=torch.float64)
    eig[0] = -1000.0
    H = with_eigenvalues(50, seed_of("exhausted"), eig)
    with pytest.raises(sensitivity_lora.NotPositiveDefiniteError, match="not positive definite"):
        fn(to(H, dev), 0.01, 2, 10.0)
    bad = spd(4, 1)
    bad[1, 2] = float("nan")
    with pytest.raises(sensitivity_lora.NotPositiveDefiniteError, match="non-finite"):
        fn(to(bad, dev))
    with pytest.raises(ValueError, match="square"):
        fn(torch.ones(3, 4, dtype=torch.float64, device=dev))


# --- cholesky_inverse_diag ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", shapes([1, 7, 40], [300, 513]))
def test_inverse_diag_matches_oracle(backend, n):
    fn, dev = implementation("cholesky_inverse_diag", backend)
    seed = seed_of("inv", n)
    H = spd(n, seed)
    L = torch.linalg.cholesky(H)
    expected = torch.linalg.inv(H).diagonal()
    out = fn(to(L, dev))
    assert out.dtype == torch.float64 and out.shape == (n,) and out.device.type == dev.type
    with seeded(seed):
        assert_sums_close(out.cpu(), expected, expected, 1e-9, f"{backend} diag(H⁻¹)")


def test_every_op_is_covered():
    """This file tests every op of the table (a new op must get its cases here)."""
    tested = {"accumulate_sumsq", "accumulate_xtx", "diag_stats", "cholesky_damped", "cholesky_inverse_diag"}
    assert set(ops.OP_NAMES) == tested
    assert {"cpu", "cuda", "triton"} <= set(ops.BACKENDS)
