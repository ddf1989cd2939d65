"""Every fast op against the reference (and the baselines the targets name), same run, same inputs.

    SL_BENCH_FULL=1 python -m pytest benchmarks/bench_ops.py --benchmark-enable -s -p no:randomly

Groups are ``<op>/<size>/<dtype>``; the last test prints a table of medians and of ratios to the
reference and to the baselines (``H.addmm_(x.T, x)`` in fp32, ``torch.linalg.cholesky``), which
is what benchmarks/RESULTS.md records. The cpu ``accumulate_xtx`` runs on its default product path
(scipy's OpenBLAS SYRK when available, else at::mm blocks; see ``sensitivity_lora.ops.native.use_external_syrk``). Without ``SL_BENCH_FULL`` a small grid runs; under
``--benchmark-disable`` (CI) every function runs once, as a smoke test of every backend.
"""
from __future__ import annotations

import os

import pytest
import torch

from sensitivity_lora import ops
from sensitivity_lora.ops import reference

FULL = os.environ.get("SL_BENCH_FULL", "") == "1"
DIMS = (576, 1536, 4096) if FULL else (576,)
TOKENS = (2048, 8192) if FULL else (2048,)
DTYPES = (torch.float32, torch.bfloat16)
CHOL_DIMS = (1024, 2048, 4096) if FULL else (512,)
DIAG_DIMS = (576, 4096, 14336) if FULL else (576,)
ROUNDS = 5

MEDIANS: dict[tuple[str, str], float] = {}  # (group, variant) -> median seconds


def _impl(op: str, backend: str):
    if not ops.available(op, backend):
        pytest.skip(f"{backend} backend unavailable: {ops.unavailable_reason(op, backend)}")
    return ops.get_op(op, "cpu", backend)


def _run(benchmark, group: str, variant: str, fn) -> None:
    benchmark.group = group
    benchmark.extra_info["variant"] = variant
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        MEDIANS[(group, variant)] = benchmark.stats.stats.median


def _activation(n: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(n * 7 + d)
    return (torch.randn(n, d, generator=g) * torch.rand(d, generator=g).add(0.1)).to(dtype)


def _mask(n: int) -> torch.Tensor:
    m = torch.ones(n, dtype=torch.bool)
    m[-n // 10 :] = False  # right padding on 10 % of the tokens
    return m


ACT_CASES = [(d, n, dt) for d in DIMS for n in TOKENS for dt in DTYPES]
ACT_IDS = [f"d{d}-t{n}-{str(dt).split('.')[-1]}" for d, n, dt in ACT_CASES]


@pytest.mark.parametrize("variant", ["reference", "cpu"])
@pytest.mark.parametrize("d, n, dtype", ACT_CASES, ids=ACT_IDS)
def test_sumsq(benchmark, variant, d, n, dtype):
    fn = _impl("accumulate_sumsq", variant)
    x, mask = _activation(n, d, dtype), _mask(n)
    acc = torch.zeros(d, dtype=torch.float64)
    _run(benchmark, f"sumsq/d{d}-t{n}/{str(dtype).split('.')[-1]}", variant, lambda: fn(acc, x, mask))


@pytest.mark.parametrize("variant", ["reference", "cpu", "addmm_fp32"])
@pytest.mark.parametrize("d, n, dtype", ACT_CASES, ids=ACT_IDS)
def test_xtx(benchmark, variant, d, n, dtype):
    x = _activation(n, d, dtype)
    group = f"xtx/d{d}-t{n}/{str(dtype).split('.')[-1]}"
    if variant == "addmm_fp32":
        # The target's baseline: one fp32 GEMM into an fp32 H (no masking, no fp64 combine).
        x32, H = x.float(), torch.zeros(d, d)
        _run(benchmark, group, variant, lambda: H.addmm_(x32.T, x32))
        return
    fn = _impl("accumulate_xtx", variant)
    acc, diag = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    _run(benchmark, group, variant, lambda: fn(acc, x, None, diag))


@pytest.mark.parametrize("variant", ["reference", "cpu", "linalg_cholesky"])
@pytest.mark.parametrize("d", CHOL_DIMS)
def test_cholesky_damped(benchmark, variant, d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(2 * d, d, generator=g, dtype=torch.float64)
    H = x.T @ x / (2 * d)
    group = f"cholesky/d{d}/float64"
    if variant == "linalg_cholesky":
        _run(benchmark, group, variant, lambda: torch.linalg.cholesky(H))
        return
    fn = _impl("cholesky_damped", variant)
    _run(benchmark, group, variant, lambda: fn(H))


@pytest.mark.parametrize("variant", ["reference", "cpu"])
@pytest.mark.parametrize("d", CHOL_DIMS)
def test_cholesky_inverse_diag(benchmark, variant, d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(2 * d, d, generator=g, dtype=torch.float64)
    L = torch.linalg.cholesky(x.T @ x / (2 * d))
    fn = _impl("cholesky_inverse_diag", variant)
    _run(benchmark, f"inverse_diag/d{d}/float64", variant, lambda: fn(L))


@pytest.mark.parametrize("variant", ["reference", "cpu"])
@pytest.mark.parametrize("d", DIAG_DIMS)
def test_diag_stats(benchmark, variant, d):
    diag = torch.rand(d, dtype=torch.float64, generator=torch.Generator().manual_seed(d)) ** 4
    fn = _impl("diag_stats", variant)
    _run(benchmark, f"diag_stats/d{d}/float64", variant, lambda: fn(diag, d, d * d // 2, 0.85))


def test_zz_report():
    """Prints medians and ratios (cpu / reference, cpu / baseline) of this run."""
    if not MEDIANS:
        pytest.skip("benchmarks disabled (--benchmark-disable): no timings to report")
    groups = sorted({g for g, _ in MEDIANS}, key=lambda g: (g.split("/")[0], g))
    lines = ["| group | reference ms | cpu ms | baseline ms | cpu / reference | cpu / baseline |",
             "|---|---:|---:|---:|---:|---:|"]
    for g in groups:
        ref, cpu = MEDIANS.get((g, "reference")), MEDIANS.get((g, "cpu"))
        base = MEDIANS.get((g, "addmm_fp32")) or MEDIANS.get((g, "linalg_cholesky"))

        def ms(v):
            return f"{v * 1e3:.2f}" if v is not None else "–"

        def ratio(a, b):
            return f"{a / b:.2f}" if a is not None and b else "–"

        lines.append(f"| {g} | {ms(ref)} | {ms(cpu)} | {ms(base)} | {ratio(cpu, ref)} | {ratio(cpu, base)} |")
    print("\n" + "\n".join(lines))
