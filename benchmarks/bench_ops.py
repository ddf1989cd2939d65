"""Every fast op against the reference (and the baselines the targets name), same run, same inputs.

    SL_BENCH_FULL=1 python -m pytest benchmarks/bench_ops.py --benchmark-enable -s -p no:cacheprovider
    OMP_NUM_THREADS=1 SL_BENCH_FULL=1 python -m pytest benchmarks/bench_ops.py --benchmark-enable -s -p no:cacheprovider

Groups are ``<op>/<size>/<dtype>``; the last test prints a table of medians and of ratios to the
reference and to the baselines (``H.addmm_(x.T, x)`` in fp32, ``torch.linalg.cholesky``) and
writes it to ``benchmarks/results/ops-threads<T>.json`` (T = torch's thread count; the small grid:
``ops-small-threads<T>.json``), from which ``benchmarks/render_results.py`` renders RESULTS.md. A
run of some groups (``-k "xtx or zz"``) replaces those rows and keeps the others with their run.
The cpu ``accumulate_xtx`` runs on its default product path (scipy's OpenBLAS SYRK when available,
else at::mm blocks; see ``sensitivity_lora.ops.native.use_external_syrk``); ``accumulate_sumsq``
accumulates Σx beside Σx², as calibration does. Without ``SL_BENCH_FULL`` a small grid runs; under
``--benchmark-disable`` (CI) every function runs once, as a smoke test of every backend, and
nothing is written.
"""
from __future__ import annotations

import os

import pytest
import torch

from results_io import LoadMonitor, column, new_run, ratio, write_table
from sensitivity_lora import ops

FULL = os.environ.get("SL_BENCH_FULL", "") == "1"
DIMS = (576, 1536, 4096) if FULL else (576,)
TOKENS = (2048, 8192) if FULL else (2048,)
DTYPES = (torch.float32, torch.bfloat16)
CHOL_DIMS = (1024, 2048, 4096) if FULL else (512,)
DIAG_DIMS = (576, 4096, 14336) if FULL else (576,)
ROUNDS = 5

MEDIANS: dict[tuple[str, str], float] = {}  # (group, variant) -> median seconds
MONITOR = LoadMonitor()  # started when pytest imports this file


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
    acc, total = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    _run(benchmark, f"sumsq/d{d}-t{n}/{str(dtype).split('.')[-1]}", variant, lambda: fn(acc, x, mask, total))


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


COLUMNS = [column("group", "group"), column("reference_ms", "reference ms", "f2"), column("cpu_ms", "cpu ms", "f2"),
           column("baseline_ms", "baseline ms", "f2"), column("cpu_vs_reference", "cpu / reference", "ratio"),
           column("cpu_vs_baseline", "cpu / baseline", "ratio")]
NOTES = ["Groups are `<op>/<size>/<dtype>`; medians of 5 rounds after a warm-up; every ratio is between two medians "
         "of the same run.",
         "Baselines: `xtx` against one fp32 `H.addmm_(x.T, x)` on the same tokens (no mask, no fp64 combine, no "
         "diagonal); `cholesky` against `torch.linalg.cholesky(H)` (no damping, no checks); the other ops have no "
         "baseline.",
         "`sumsq` rows have 10 % masked tokens as in real calibration; `xtx` rows are unmasked."]


def report_rows() -> list[dict]:
    """One row per group: medians in ms and the ratios of this run."""
    rows = []
    for g in sorted({g for g, _ in MEDIANS}, key=lambda g: (g.split("/")[0], g)):
        ref, cpu = MEDIANS.get((g, "reference")), MEDIANS.get((g, "cpu"))
        base = MEDIANS.get((g, "addmm_fp32")) or MEDIANS.get((g, "linalg_cholesky"))
        ms = (lambda v: round(v * 1e3, 4) if v is not None else None)
        rows.append({"group": g, "reference_ms": ms(ref), "cpu_ms": ms(cpu), "baseline_ms": ms(base),
                     "cpu_vs_reference": ratio(cpu, ref), "cpu_vs_baseline": ratio(cpu, base)})
    return rows


def test_zz_report():
    """Prints medians and ratios (cpu / reference, cpu / baseline) of this run and writes them to benchmarks/results/."""
    if not MEDIANS:
        pytest.skip("benchmarks disabled (--benchmark-disable): no timings to report")
    rows = report_rows()
    lines = ["| group | reference ms | cpu ms | baseline ms | cpu / reference | cpu / baseline |",
             "|---|---:|---:|---:|---:|---:|"]

    def ms(v):
        return f"{v:.2f}" if v is not None else "–"

    def rt(v):
        return f"{v:.2f}" if v is not None else "–"

    for r in rows:
        lines.append(f"| {r['group']} | {ms(r['reference_ms'])} | {ms(r['cpu_ms'])} | {ms(r['baseline_ms'])} "
                     f"| {rt(r['cpu_vs_reference'])} | {rt(r['cpu_vs_baseline'])} |")
    print("\n" + "\n".join(lines))
    threads = torch.get_num_threads()
    name = f"ops-threads{threads}" if FULL else f"ops-small-threads{threads}"
    title = f"cpu backend against the reference, {threads} thread{'s' if threads != 1 else ''}"
    write_table(name, benchmark="bench_ops", title=title + ("" if FULL else " (small grid)"), columns=COLUMNS,
                rows=rows, run=new_run(MONITOR.stop()), key="group", notes=NOTES)
