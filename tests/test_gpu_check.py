"""scripts/gpu_check.sh: the dry run (every stage's CPU-checkable part) passes here and writes JSON of
the stable schema; a stage over its limit is cut and reported; the per-test limit plugin works.

The GPU run itself needs a GPU (docs/gpu.md, "GPU check: stage plan"); these keep the script from
rotting in between.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
# The GPU check builds the package from the checkout on the GPU machine: a tool of the source tree.
pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").exists(),
                                reason="the GPU check builds from a checkout; this tree has no setup.py")
STAGES = ["env", "build", "tests_ops", "tests_triton", "tests_e2e", "bench_e2e", "bench_ops", "bench_eig"]
STATUSES = {"ok", "failed", "timeout", "skipped"}
DRY_RUN_LIMIT_S = 400  # generous: CI's machine is shared; the run itself takes ~35 s of CPU here


def _env() -> dict:
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1")
    for var in ("SENSITIVITY_LORA_BACKEND", "TRITON_INTERPRET", "PYTEST_ADDOPTS"):
        env.pop(var, None)
    return env


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{args} did not finish within {timeout} s:\n{(exc.stdout or '')[-3000:]}")


def check_schema(data: dict) -> None:
    """The stable top-level schema of gpu_check.json (version 1)."""
    assert data["schema"] == "sensitivity_lora.gpu_check" and data["version"] == 1
    for key, kind in [("mode", str), ("ok", bool), ("exit_code", int), ("started", str), ("finished", str),
                      ("seconds", float), ("time_limit_s", float), ("machine", dict), ("stages", list),
                      ("failed_stages", list), ("python", str)]:
        assert isinstance(data[key], kind), f"{key}: {data[key]!r} is not {kind.__name__}"
    assert data["mode"] in ("gpu", "dry-run")
    assert [s["name"] for s in data["stages"]] == STAGES
    for s in data["stages"]:
        assert set(s) >= {"name", "what", "status", "seconds", "limit_s", "command", "log", "error", "result"}, s
        assert s["status"] in STATUSES, s
        assert s["error"] is None or isinstance(s["error"], str)
        if s["status"] not in ("skipped",) or s["seconds"] is not None:
            assert isinstance(s["seconds"], (int, float)) and s["seconds"] >= 0, s
    assert data["ok"] == (data["exit_code"] == 0) == (not data["failed_stages"])


def check_bench(result: dict, stage: str) -> None:
    assert result["schema"] == "sensitivity_lora.bench_gpu" and result["version"] == 1
    assert result["stage"] == stage and result["status"] == "ok" and result["error"] is None


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    start = time.monotonic()
    proc = _run(["bash", str(SCRIPT), str(out), "--dry-run"], DRY_RUN_LIMIT_S)
    seconds = time.monotonic() - start
    report = out / "gpu_check.json"
    assert report.exists(), f"no JSON written:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    return proc, json.loads(report.read_text()), out, seconds


def test_dry_run_passes(dry_run):
    proc, data, out, seconds = dry_run
    failed = {s["name"]: s["error"] for s in data["stages"] if s["status"] != "ok"}
    assert proc.returncode == 0 and data["ok"], f"dry run failed {failed}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert not failed
    assert "[gpu_check " in proc.stdout and "OK —" in proc.stdout  # progress lines with timestamps
    print(f"dry run: {seconds:.1f} s")


def test_dry_run_json_schema(dry_run):
    _, data, out, _ = dry_run
    check_schema(data)
    assert data["mode"] == "dry-run"
    stages = {s["name"]: s for s in data["stages"]}
    # build: formed and printed, not run
    build = stages["build"]["result"]
    assert "build_ext --inplace --force" in stages["build"]["command"]
    assert build["env"]["SENSITIVITY_LORA_FORCE_CUDA"] == "1" and build["env"]["MAX_JOBS"] == str(os.cpu_count())
    assert build["setup_py_parses"] is True
    # tests: collected (and the Triton interpreter smoke where triton is installed)
    parts = {p["name"]: p for p in stages["tests_ops"]["result"]["parts"]}
    assert parts["collect"]["collected"] > 100
    if "triton-interpreter" in parts:
        assert parts["triton-interpreter"]["passed"] >= 5 and parts["triton-interpreter"]["failures"] == 0
    if stages["tests_triton"]["status"] == "ok":
        assert stages["tests_triton"]["result"]["parts"][0]["collected"] > 0
    # the benchmark's code paths on a tiny CPU model
    agree = stages["tests_e2e"]["result"]
    check_bench(agree, "agree")
    assert [c["status"] for c in agree["checks"] if c["backend"] == "cpu"] == ["ok"]
    e2e = stages["bench_e2e"]["result"]
    check_bench(e2e, "e2e")
    assert e2e["floor"]["rates"]["bfloat16"]["best_tflops"] > 0 and e2e["forward"]["seconds"] > 0
    runs = [r for r in e2e["runs"] if r["status"] == "ok"]
    assert {(r["backend"], r["mode"]) for r in runs} == {(b, m) for b in ("reference", "cpu") for m in ("diag", "full")}
    for r in runs:
        assert set(r) >= {"seconds", "floor_seconds", "ratio_to_floor", "ratio_to_forward", "ratio_to_paper",
                          "peak_gib", "tokens", "tokens_timed", "scaled"}
        assert r["seconds"] > 0 and r["floor_seconds"] > 0
        assert (r["syrk_flops"] > 0) == (r["mode"] == "full")
    ops = stages["bench_ops"]["result"]
    check_bench(ops, "ops")
    variants = {r["variant"] for r in ops["xtx"] if r["status"] == "ok"}
    assert {"reference", "cpu", "addmm_bf16", "addmm_fp32"} <= variants
    assert {r["variant"] for r in ops["cholesky"] if r["status"] == "ok"} >= {"torch.linalg.cholesky", "reference"}
    eig = stages["bench_eig"]["result"]
    assert [(r["d"], r["k"], r["block_method"], r["reference"]) for r in eig["rows"]] == [(512, 16, "block", "dense")]
    assert float(eig["rows"][0]["min_signed_cos"]) >= 0.999 and eig["rows"][0]["h100_estimate_ms"] > 0
    # the markdown for benchmarks/RESULTS.md
    md = (out / "gpu_check.md").read_text()
    for heading in ("| stage | status |", "| mode | backend | time s |", "| op | d | tokens | variant |",
                    "| tests | passed |", "| d | k | block s |"):
        assert heading in md


def test_a_stage_over_its_limit_is_cut_and_the_json_still_written(tmp_path):
    proc = _run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), str(tmp_path), "--dry-run",
                 "--only", "bench_ops", "--stage-limit", "bench_ops=1"], 200)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    check_schema(data)
    stages = {s["name"]: s for s in data["stages"]}
    assert proc.returncode == 1 and data["exit_code"] == 1 and data["failed_stages"] == ["bench_ops"]
    assert stages["bench_ops"]["status"] == "timeout" and "limit" in stages["bench_ops"]["error"]
    assert stages["env"]["status"] == "ok"
    assert all(stages[n]["status"] == "skipped" for n in STAGES if n not in ("env", "bench_ops"))
    assert (tmp_path / "gpu_check.md").exists()


def test_per_test_limit_fails_the_slow_test_and_runs_the_rest(tmp_path):
    (tmp_path / "test_slow.py").write_text(textwrap.dedent("""
        import time

        def test_slow():
            time.sleep(30)

        def test_after():
            pass
    """))
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "scripts"), env.get("PYTHONPATH", "")])
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path / "test_slow.py"), "-p", "gpu_check",
                           "--per-test-limit", "1", "-o", "addopts=", "-p", "no:cacheprovider", "-rf", "-q"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 25
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "1 failed, 1 passed" in proc.stdout and "per-test limit of 1 s" in proc.stdout, proc.stdout[-2000:]


def test_usage_error_without_outdir():
    proc = _run(["bash", str(SCRIPT)], 30)
    assert proc.returncode == 2 and "usage" in proc.stderr
