"""accumulate_xtx against the fp64 oracle: the reference, and the cpu op on both of its product
paths (scipy's OpenBLAS SYRK, split by tokens for d <= 1024 and by columns above; at::mm blocks),
every dtype, mask kind, layout and thread count that selects a different code path.
"""
from __future__ import annotations

import os

import pytest
import torch

from oracles import (ACCUMULATION_RTOL, FLOAT_DTYPES, activation, assert_gram_close, assert_sums_close, case_seed,
                     op_for, oracle_xtx, token_mask)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# --- accumulate_xtx -----------------------------------------------------------------------------

# 300 and 577 cross the C++ leaf size (256) and are not multiples of any tile; 4500 and 8300 tokens
# span two and three 4096-token chunks; 577 is split between threads on the SYRK path.
XTX_SHAPES = [(0, 8), (3, 1), (50, 7), (700, 300), (4500, 130), (600, 577), (8300, 290)]
# The cpu accumulate_xtx has two product paths: scipy's OpenBLAS SYRK (the default when found) and
# at::mm GEMMs on upper-triangle blocks; both are tested.
XTX_BACKENDS = ("reference", "cpu-syrk", "cpu-gemm")


@pytest.fixture
def xtx_for():
    """accumulate_xtx of a backend of XTX_BACKENDS (cpu-* set the product path; restored after)."""
    touched = []

    def get(backend: str):
        if backend == "reference":
            return op_for("accumulate_xtx", "reference")
        fn = op_for("accumulate_xtx", "cpu")
        from sensitivity_lora.ops import native as _native
        touched.append(_native)
        if _native.use_external_syrk(backend == "cpu-syrk") != (backend == "cpu-syrk"):
            pytest.skip("scipy's BLAS is not OpenBLAS (no ssyrk with a thread setter): SYRK path unavailable")
        return fn

    yield get
    for native in touched:
        native.use_external_syrk(native.syrk_default())


@pytest.mark.parametrize("backend", XTX_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", XTX_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mask_kind", ["none", "random", "all-masked"])
def test_xtx_matches_oracle(xtx_for, backend, dtype, shape, mask_kind):
    fn = xtx_for(backend)
    n, d = shape
    seed = case_seed("xtx", dtype, shape, mask_kind)
    x = activation(n, d, dtype, seed)
    mask = token_mask(n, mask_kind, seed)
    base = oracle_xtx(activation(20, d, torch.float64, seed + 1), None)  # non-zero start: must add
    acc = base.clone()
    diag = base.diagonal().clone()
    fn(acc, x, mask, diag)
    expected = base + oracle_xtx(x, mask)
    assert_gram_close(acc, expected, ACCUMULATION_RTOL)
    assert_sums_close(diag, expected.diagonal(), expected.diagonal(), ACCUMULATION_RTOL, "diagonal side output")


@pytest.mark.parametrize("backend", XTX_BACKENDS)
@pytest.mark.parametrize("layout", ["row-strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("masked", [True, False], ids=["masked", "dense"])
def test_xtx_non_contiguous(xtx_for, backend, layout, dtype, masked):
    fn = xtx_for(backend)
    x = activation(500, 270, dtype, case_seed("xtx-nc", layout, dtype), layout)
    mask = token_mask(500, "random", 4) if masked else None
    acc = torch.zeros(270, 270, dtype=torch.float64)
    fn(acc, x, mask)
    assert_gram_close(acc, oracle_xtx(x, mask), ACCUMULATION_RTOL)


# The SYRK path splits the tokens between the threads up to d = 1024 (one scratch per thread, summed
# per round of 4096-token slices) and the triangle's columns above it (d // 128 parts at most), each
# in one parallel region: other thread counts must give the same sums.
@pytest.mark.parametrize("backend", ["cpu-syrk", "cpu-gemm"])
@pytest.mark.parametrize("threads", [1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4200, 700), (13000, 130), (700, 1100)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_xtx_cpu_thread_counts(xtx_for, backend, threads, dtype, shape):
    fn = xtx_for(backend)
    n, d = shape
    x = activation(n, d, dtype, case_seed("xtx-threads", backend, threads, dtype, shape))
    mask = token_mask(n, "random", 5) if dtype == torch.bfloat16 else None
    acc, diag = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fn(acc, x, mask, diag)
    finally:
        torch.set_num_threads(before)
    expected = oracle_xtx(x, mask)
    assert_gram_close(acc, expected, ACCUMULATION_RTOL)
    assert_sums_close(diag, expected.diagonal(), expected.diagonal(), ACCUMULATION_RTOL, "diagonal side output")


# The token-split SYRK path (d <= 1024, 2+ threads) at pinned thread counts: every dtype and mask
# kind, a non-zero start, an accumulator with a row stride wider than d (a view), two rounds of
# 4096-token slices with idle threads in the second, and bitwise-equal results on a repeat.
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "random", "all-masked"])
def test_xtx_token_split_path(xtx_for, threads, dtype, mask_kind):
    fn = xtx_for("cpu-syrk")
    n, d = 9000, 200
    seed = case_seed("xtx-token-split", threads, dtype, mask_kind)
    x = activation(n, d, dtype, seed)
    mask = token_mask(n, mask_kind, seed)
    base = oracle_xtx(activation(20, d, torch.float64, seed + 1), None)
    results = []
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(2):
            wide = torch.zeros(d, d + 7, dtype=torch.float64)
            acc = wide[:, :d]  # stride(0) = d + 7
            acc.copy_(base)
            diag = base.diagonal().clone()
            fn(acc, x, mask, diag)
            results.append((acc.clone(), diag))
    finally:
        torch.set_num_threads(before)
    expected = base + oracle_xtx(x, mask)
    assert_gram_close(results[0][0], expected, ACCUMULATION_RTOL)
    assert_sums_close(results[0][1], expected.diagonal(), expected.diagonal(), ACCUMULATION_RTOL, "diagonal")
    assert torch.equal(results[0][0].triu(), results[1][0].triu()) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("backend", XTX_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_xtx_single_strided_column(xtx_for, backend, dtype):
    """A (n, 1) column of a wider tensor: the row stride is the wide tensor's, not 1."""
    fn = xtx_for(backend)
    wide = activation(700, 5, dtype, 31)
    x = wide[:, 2:3]
    acc, diag = torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    fn(acc, x, token_mask(700, "random", 2), diag)
    expected = oracle_xtx(x, token_mask(700, "random", 2))
    assert_gram_close(acc, expected, ACCUMULATION_RTOL)


@pytest.mark.parametrize("backend", XTX_BACKENDS)
def test_xtx_into_transposed_accumulator(xtx_for, backend):
    fn = xtx_for(backend)
    x = activation(400, 90, torch.float32, 21)
    acc_t = torch.zeros(90, 90, dtype=torch.float64).T  # stride(1) != 1
    fn(acc_t, x)
    assert_gram_close(acc_t, oracle_xtx(x, None), ACCUMULATION_RTOL)
