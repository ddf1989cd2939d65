"""One prepared GPU check: build, test and time every GPU path in one short run (docs/gpu.md).

    bash scripts/gpu_check.sh OUTDIR            # on one NVIDIA GPU (sm_80/sm_90), no network
    bash scripts/gpu_check.sh OUTDIR --dry-run  # on a CPU machine: every stage's CPU-checkable part

Stages (each in its own subprocess, with its own time limit, killed with its process group when
it runs over; the run as a whole stops starting stages at TOTAL_LIMIT_S and keeps each later
stage's reserve free):

    env           versions, the GPU, the tools (pytest, ninja, nvcc, triton)
    build         python setup.py build_ext --inplace --force, CUDA, this GPU's arch only
    tests_ops     pytest tests/test_ops_backends.py        (cpu, cuda, triton vs the fp64 oracles)
    tests_triton  pytest -m gpu tests/test_triton.py       (Triton kernels on CUDA tensors)
    tests_e2e     bench_gpu.py --stage agree               (two 8B-width blocks: backends vs reference)
    bench_e2e     bench_gpu.py --stage e2e                 (8B shape, 128 × 2048 tokens, bf16, diag+full)
    bench_ops     bench_gpu.py --stage ops                 (XᵀX d = 4096, 14336; Cholesky d = 4096)
    bench_eig     bench_eigensolver.py --device cuda       (top-k eigenpairs, d = 4096, 14336: block vs eigh)

Writes OUTDIR/gpu_check.json (schema ``sensitivity_lora.gpu_check``, version 1; rewritten after
every stage), OUTDIR/gpu_check.md (tables for benchmarks/RESULTS.md), OUTDIR/logs/<stage>.log and
the stages' own JSON/JUnit files. Exit 0 when every stage passed (a stage skipped for a missing
optional tool, e.g. triton, does not fail the run), 1 otherwise, 2 on bad usage.

Imported by pytest as the plugin ``-p gpu_check`` (scripts/ on the path), it adds
``--per-test-limit SECONDS``: each test that runs longer fails with PerTestTimeLimit and the run
goes on (SIGALRM; a kernel stuck inside one CUDA call is caught by the stage's limit instead).
pytest-timeout is not needed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

from gpu_check_markdown import markdown  # noqa: E402 - scripts/ is on sys.path when this runs as a script

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "sensitivity_lora.gpu_check"
VERSION = 1
TOTAL_LIMIT_S = 450.0  # stages start only within this; scripts/gpu_check.sh kills the run at 470 s
STATUSES = ("ok", "failed", "timeout", "skipped")  # of a finished stage; "pending"/"running" while the run lasts


class StagePlan:
    def __init__(self, name: str, limit_s: float, reserve_s: float, what: str, dry_limit_s: float = 90.0):
        self.name, self.limit_s, self.reserve_s, self.what, self.dry_limit_s = name, limit_s, reserve_s, what, dry_limit_s


# limit_s: the most a stage may take; reserve_s: what is kept free for it while earlier stages run.
PLAN = [
    StagePlan("env", 30, 10, "versions, GPU, tools", 30),
    StagePlan("build", 240, 60, "build the extension in place with CUDA for this GPU's arch", 30),
    StagePlan("tests_ops", 150, 45, "pytest tests/test_ops_backends.py (cpu, cuda, triton vs fp64 oracles)", 60),
    StagePlan("tests_triton", 120, 40, "pytest -m gpu tests/test_triton.py (Triton kernels on CUDA tensors)", 45),
    StagePlan("tests_e2e", 90, 30, "bench_gpu.py --stage agree (GPU backends vs reference, 2 blocks of 8B widths)", 45),
    StagePlan("bench_e2e", 200, 90, "bench_gpu.py --stage e2e (8B shape, 128 x 2048 tokens, bf16, diag + full)", 45),
    StagePlan("bench_ops", 60, 25, "bench_gpu.py --stage ops (XtX d=4096/14336 vs addmm_, Cholesky d=4096)", 30),
    StagePlan("bench_eig", 60, 20, "bench_eigensolver.py --device cuda (top-k eigenpairs, d=4096/14336, block vs eigh)",
              60),
]
PER_TEST_LIMIT_S = 60.0
# SL_GPU_CHECK_SIMULATE=1 (testing the check itself on a CPU machine): the GPU run's commands run
# as they would on a GPU, without the "no CUDA device" stop; they fail or skip where a GPU is needed.
SIMULATE = os.environ.get("SL_GPU_CHECK_SIMULATE") == "1"
CUDA_OPS = ("accumulate_sumsq", "accumulate_xtx", "diag_stats")
# The Triton interpreter smoke of the dry run: a few cases of every op (the full set runs in CI's test_triton.py).
TRITON_SMOKE = ("triton and (test_sumsq_matches_oracle and 37x5 and bfloat16 or test_xtx_matches_oracle and 45x17 "
                "and float32 or test_diag_stats_matches_oracle and float64-0.85-3-7- or test_cholesky_spd and float64-37 "
                "or test_inverse_diag and 7-triton)")


# --- the pytest plugin (-p gpu_check) -----------------------------------------------------------

class PerTestTimeLimit(BaseException):
    """Raised in a test that ran past --per-test-limit (BaseException: `except Exception` can't eat it)."""


try:
    import pytest as _pytest
except ImportError:  # the check itself runs without pytest
    _pytest = None

if _pytest is not None:
    _TEST_START: dict[str, float] = {}

    def pytest_addoption(parser):
        parser.addoption("--per-test-limit", type=float, default=0.0,
                         help="fail a test (setup + call + teardown) that runs longer than this many seconds")

    def _alarm(limit: float):
        def handler(signum, frame):
            raise PerTestTimeLimit(f"test ran past the per-test limit of {limit:g} s (gpu_check)")
        return handler

    def _phase(item):
        limit = item.config.getoption("--per-test-limit")
        if not limit or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
            yield
            return
        start = _TEST_START.setdefault(item.nodeid, time.monotonic())
        remaining = limit - (time.monotonic() - start)
        previous = signal.signal(signal.SIGALRM, _alarm(limit))
        signal.setitimer(signal.ITIMER_REAL, max(remaining, 0.001))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    @_pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(item):
        yield from _phase(item)

    @_pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(item):
        yield from _phase(item)

    @_pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(item):
        yield from _phase(item)


# --- helpers ------------------------------------------------------------------------------------

_T0 = time.monotonic()


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def say(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')} +{time.monotonic() - _T0:5.1f}s] {message}", flush=True)


def probe(py: str, code: str, env: dict, timeout: float = 60.0) -> tuple[int, str]:
    try:
        p = subprocess.run([py, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        return p.returncode, (p.stdout + p.stderr).strip()
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:g} s"


class Runner:
    """Runs one stage's subprocess: log file, live progress lines, process-group kill on timeout."""

    current: subprocess.Popen | None = None

    def __init__(self, log_path: Path, echo: Callable | None = None):
        self.log_path = log_path
        self.echo = echo

    def run(self, cmd: list[str], env: dict, limit_s: float) -> tuple[int | None, float, bool]:
        """(exit code or None when cut, seconds, timed_out)."""
        start = time.monotonic()
        with open(self.log_path, "a", encoding="utf-8", errors="replace") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, text=True,
                                    errors="replace", bufsize=1)
            Runner.current = proc

            def pump():
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    if self.echo is None or self.echo(line):
                        text = line.rstrip()
                        print(f"    | {text[:400]}{' …' if len(text) > 400 else ''}", flush=True)

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            timed_out = False
            try:
                proc.wait(timeout=max(limit_s, 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
                kill_group(proc)
            reader.join(timeout=10)
            Runner.current = None
            seconds = time.monotonic() - start
            if timed_out:
                log.write(f"\n[gpu_check] cut after {seconds:.1f} s (limit {limit_s:.0f} s)\n")
            return (None if timed_out else proc.returncode), seconds, timed_out


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the stage's process group (it was started in its own session), SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def last_error_line(path: Path) -> str | None:
    """The most telling line of a failed subprocess log (an error line, else the last line)."""
    text = tail(path, 400).splitlines()
    for pattern in (r"error:", r"Error\b", r"FAILED", r"error\b"):
        hits = [line.strip() for line in text if re.search(pattern, line)]
        if hits:  # the first is usually the cause (a compiler error), the last the consequence
            return (hits[0][:300] + (f" … {hits[-1][:200]}" if len(hits) > 1 and hits[-1] != hits[0] else ""))
    return text[-1].strip()[:400] if text else None


def junit_summary(path: Path) -> dict | None:
    """Counts, failures (name + first message line) and skip reasons from a JUnit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failures, skips = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for kind in ("failure", "error"):
            el = case.find(kind)
            if el is not None:
                msg = (el.get("message") or el.text or "").strip().splitlines()
                failures.append({"test": name, "kind": kind, "message": (msg[0] if msg else "")[:300]})
        el = case.find("skipped")
        if el is not None:
            reason = (el.get("message") or "").strip()[:200]
            skips[reason] = skips.get(reason, 0) + 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed_tests": failures[:40], "failed_total": len(failures),
            "skip_reasons": [{"reason": r, "count": c} for r, c in sorted(skips.items(), key=lambda kv: -kv[1])][:15]}


class TestEcho:
    """Which pytest -v lines to show live: failures, errors, summaries, and every 50th result."""

    RESULT = re.compile(r"::\S+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")

    def __init__(self):
        self.results = 0

    def __call__(self, line: str) -> bool:
        if self.RESULT.search(line):
            self.results += 1
            return "FAILED" in line or "ERROR" in line or self.results % 50 == 0
        return bool(re.match(r"(=+ |FAILED |ERROR |\d+ (passed|failed)|collected |.*per-test limit)", line))


def log_summary(path: Path, since: int = 0) -> dict:
    """Counts from pytest -v result lines in a log (when a cut run left no JUnit report)."""
    text = path.read_text(errors="replace")[since:] if path.exists() else ""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "passed": 0}
    failed = []
    for m in re.finditer(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", text, re.M):
        counts["tests"] += 1
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failures", "ERROR": "errors"}.get(m.group(2), "skipped")
        counts[key] += 1
        if key in ("failures", "errors"):
            failed.append({"test": m.group(1), "kind": key, "message": ""})
    last = re.findall(r"^(\S+::\S+)", text, re.M)
    return {**counts, "failed_tests": failed[:40], "failed_total": len(failed), "skip_reasons": [],
            "from_log": True, "last_test_started": last[-1] if last else None}


def cuda_root(env: dict) -> tuple[str | None, str]:
    """The CUDA toolkit root that holds the real nvcc (CUDA_HOME, else asked of nvcc, else /usr/local/cuda)."""
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if home and Path(home, "bin", "nvcc").exists():
        return str(Path(home).resolve()), "CUDA_HOME"
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        try:
            out = subprocess.run([nvcc, "-dryrun", "-E", "-x", "cu", "/dev/null"], capture_output=True, text=True,
                                 timeout=30).stderr
            top = next((line.split("TOP=", 1)[1].strip() for line in out.splitlines() if "TOP=" in line), None)
            if top and Path(top, "bin", "nvcc").exists():
                return str(Path(top).resolve()), f"nvcc on PATH ({nvcc})"
        except (OSError, subprocess.TimeoutExpired):
            pass
        guess = Path(nvcc).resolve().parent.parent
        if Path(guess, "bin", "nvcc").exists():
            return str(guess), f"nvcc on PATH ({nvcc})"
    for guess in ("/usr/local/cuda", *sorted(map(str, Path("/usr/local").glob("cuda-*")), reverse=True)):
        if Path(guess, "bin", "nvcc").exists():
            return str(Path(guess).resolve()), "default location"
    return None, "no nvcc found (CUDA_HOME, PATH, /usr/local/cuda*)"


# --- the check ----------------------------------------------------------------------------------

class Check:
    def __init__(self, outdir: Path, dry_run: bool, py: str, total_limit_s: float, only: set[str] | None,
                 limits: dict[str, float], keep_going: bool):
        self.out = outdir
        self.dry = dry_run
        self.py = py
        self.total = total_limit_s
        self.only = only
        self.limits = limits
        self.keep_going = keep_going
        self.t0 = time.monotonic()
        (outdir / "logs").mkdir(parents=True, exist_ok=True)
        self.env = self._base_env()
        self.machine: dict = {}
        self.stages = [{"name": p.name, "what": p.what, "status": "pending", "seconds": None, "limit_s": None,
                        "command": None, "log": f"logs/{p.name}.log", "error": None, "result": None} for p in PLAN]
        self.data = {"schema": SCHEMA, "version": VERSION, "mode": "dry-run" if dry_run else "gpu",
                     "ok": None, "exit_code": None, "started": now_iso(), "finished": None, "seconds": None,
                     "time_limit_s": total_limit_s, "root": str(ROOT), "python": py,
                     "machine": self.machine, "stages": self.stages}
        self.write()

    # environment of every stage
    def _base_env(self) -> dict:
        env = dict(os.environ)
        for var in ("SENSITIVITY_LORA_BACKEND", "TRITON_INTERPRET", "SL_TRITON_ON_CPU", "PYTEST_ADDOPTS"):
            env.pop(var, None)
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false", PYTHONDONTWRITEBYTECODE="1")
        paths = [str(ROOT), str(ROOT / "scripts")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        # the interpreter's own bin (pip's ninja, nvcc wrappers) before the rest of PATH
        env["PATH"] = os.pathsep.join([str(Path(self.py).parent), env.get("PATH", "")])
        return env

    def write(self) -> None:
        self.data["seconds"] = time.monotonic() - self.t0
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.out / "gpu_check.json")

    def stage(self, name: str) -> dict:
        return next(s for s in self.stages if s["name"] == name)

    def limit_for(self, index: int) -> tuple[float, bool]:
        """(the stage's limit, whether the run's deadline rather than the stage's own limit sets it):
        its own limit, but never into the reserves of the selected later stages."""
        plan = PLAN[index]
        base = self.limits.get(plan.name, plan.dry_limit_s if self.dry else plan.limit_s)
        later = sum(p.reserve_s for p in PLAN[index + 1:] if self.selected(p.name))
        left = self.total - (time.monotonic() - self.t0) - later
        return min(base, left), left < base

    def selected(self, name: str) -> bool:
        return self.only is None or name in self.only

    def run_cmd(self, st: dict, cmd: list[str], limit: float, env: dict | None = None,
                echo: Callable | None = None) -> tuple[int | None, float, bool]:
        st["command"] = shlex.join(cmd) if st["command"] is None else st["command"] + " && " + shlex.join(cmd)
        self.write()
        say(f"{st['name']}: $ {shlex.join(cmd)}")
        return Runner(self.out / st["log"], echo).run(cmd, env or self.env, limit)

    # the run
    def run(self) -> int:
        stop_reason = None
        for index, plan in enumerate(PLAN):
            st = self.stage(plan.name)
            if not self.selected(plan.name):
                st.update(status="skipped", error="not selected (--only)")
                continue
            if stop_reason:
                st.update(status="skipped", error=stop_reason)
                self.write()
                continue
            limit, by_deadline = self.limit_for(index)
            st["limit_s"] = round(limit, 1)
            if by_deadline and limit < 3:
                st.update(status="timeout", error=f"not started: the run's {self.total:.0f} s limit was reached")
                say(f"{plan.name}: TIMEOUT (not started, no time left)")
                self.write()
                continue
            st["status"] = "running"
            self.write()
            say(f"{plan.name}: start ({plan.what}; limit {limit:.0f} s)")
            start = time.monotonic()
            try:
                getattr(self, f"stage_{plan.name}")(st, limit)
            except Exception as exc:  # a bug in the check itself: report it, go on
                st.update(status="failed", error=f"gpu_check: {type(exc).__name__}: {exc}")
            st["seconds"] = round(time.monotonic() - start, 2)
            line = f"{plan.name}: {st['status'].upper()} in {st['seconds']:.1f} s"
            say(line + (f" — {st['error']}" if st["error"] else ""))
            self.write()
            if plan.name == "env" and st["status"] == "failed":
                stop_reason = f"not run: the env stage failed ({st['error']})"
            if plan.name == "build" and st["status"] in ("failed", "timeout") and not self.keep_going:
                stop_reason = "not run: the build failed (--keep-going runs the rest anyway)"
        return self.finish()

    def finish(self) -> int:
        bad = [s["name"] for s in self.stages if s["status"] in ("failed", "timeout", "running")]
        self.data["ok"] = not bad
        self.data["exit_code"] = 0 if not bad else 1
        self.data["failed_stages"] = bad
        self.data["finished"] = now_iso()
        self.write()
        try:
            text = markdown(self.data)
        except Exception as exc:  # the JSON is what counts; never lose the exit status over the tables
            text = f"(gpu_check could not render the tables: {type(exc).__name__}: {exc}; see gpu_check.json)\n"
        (self.out / "gpu_check.md").write_text(text)
        print("\n" + text, flush=True)
        say(f"{'OK' if not bad else 'FAILED: ' + ', '.join(bad)} — {self.out / 'gpu_check.json'}, "
            f"{self.out / 'gpu_check.md'} ({time.monotonic() - self.t0:.0f} s)")
        return self.data["exit_code"]

    # --- stages ---------------------------------------------------------------------------------

    def stage_env(self, st: dict, limit: float) -> None:
        code = r"""
import json, os, platform, sys, importlib.util
info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
        "cpu_count": os.cpu_count()}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=list(torch.cuda.get_device_capability(0)), sms=p.multi_processor_count,
                    gpu_memory_gib=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
    from torch.utils import cpp_extension
    info["ninja"] = bool(cpp_extension.is_ninja_available())
except Exception as exc:
    info["torch_error"] = f"{type(exc).__name__}: {exc}"
from importlib import metadata
for mod, dist in (("triton", "triton"), ("transformers", "transformers"), ("peft", "peft"), ("pytest", "pytest"),
                  ("pytest_timeout", "pytest-timeout"), ("pytest_benchmark", "pytest-benchmark"),
                  ("safetensors", "safetensors"), ("setuptools", "setuptools"), ("numpy", "numpy"), ("scipy", "scipy")):
    # installed and findable (versions without importing: transformers and peft take seconds)
    if importlib.util.find_spec(mod) is None:
        info[mod] = None
        info[mod + "_error"] = f"no module named {mod!r}"
        continue
    try:
        info[mod] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        info[mod] = "present"
print("GPU_CHECK_ENV " + json.dumps(info))
"""
        say(f"env: probing {self.py}")
        st["command"] = f"{self.py} -c <env probe>"
        rc, secs, cut = Runner(self.out / st["log"], lambda line: not line.startswith("GPU_CHECK_ENV")).run(
            [self.py, "-c", code], self.env, limit)
        if cut:
            st.update(status="timeout", error=f"the env probe ran past {limit:.0f} s")
            return
        text = (self.out / st["log"]).read_text(errors="replace")
        found = [line for line in text.splitlines() if line.startswith("GPU_CHECK_ENV ")]
        if rc != 0 or not found:
            st.update(status="failed", error=f"the env probe failed (exit {rc}): {last_error_line(self.out / st['log'])}")
            return
        self.machine.update(json.loads(found[-1].split(" ", 1)[1]))
        root, how = cuda_root(self.env)
        self.machine.update(cuda_home=root, cuda_home_from=how)
        if root:
            try:
                v = subprocess.run([str(Path(root, "bin", "nvcc")), "--version"], capture_output=True, text=True,
                                   timeout=30).stdout
                self.machine["nvcc"] = (re.findall(r"release [\d.]+, V[\d.]+", v) or [v.strip()[-80:]])[0]
            except (OSError, subprocess.TimeoutExpired) as exc:
                self.machine["nvcc"] = f"unusable: {exc}"
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                self.machine["nvidia_smi"] = subprocess.run(
                    [smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                     "--format=csv,noheader"], capture_output=True, text=True, timeout=15).stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                self.machine["nvidia_smi"] = None
        m = self.machine
        say(f"env: python {m.get('python')}, torch {m.get('torch')} (CUDA {m.get('torch_cuda')}), "
            f"triton {m.get('triton')}, transformers {m.get('transformers')}, peft {m.get('peft')}, "
            f"pytest {m.get('pytest')}, ninja {m.get('ninja')}, nvcc {m.get('nvcc')} at {m.get('cuda_home')}; "
            f"GPU: {m.get('gpu', 'none')} {m.get('capability', '')}; {m.get('cpu_count')} cores")
        st["result"] = {k: m.get(k) for k in ("torch", "torch_cuda", "gpu", "capability", "triton", "pytest")}
        problems = []
        if "torch_error" in m:
            problems.append(f"torch does not import: {m['torch_error']}")
        if SIMULATE and not self.dry:  # a CPU rehearsal of the GPU code path (see SIMULATE)
            m.setdefault("capability", [9, 0])
            m["simulated"] = True
        elif not self.dry and not m.get("cuda_available"):
            problems.append(f"torch sees no CUDA device ({self.py}, torch {m.get('torch')}, CUDA {m.get('torch_cuda')}); "
                            "on a CPU machine use --dry-run")
        for mod in ("transformers", "peft"):
            if m.get(mod) is None:
                problems.append(f"{mod} is not installed")
        if problems:
            st.update(status="failed", error="; ".join(problems))
        else:
            st["status"] = "ok"

    def _arch(self) -> tuple[str, str]:
        cap = self.machine.get("capability")
        if cap:
            return f"{cap[0]}.{cap[1]}", "the present GPU (torch.cuda.get_device_capability)"
        return os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"), "dry run: no GPU here, placeholder (the GPU run uses its own)"

    def stage_build(self, st: dict, limit: float) -> None:
        arch, arch_from = self._arch()
        jobs = str(max(1, os.cpu_count() or 1))
        root, how = self.machine.get("cuda_home"), self.machine.get("cuda_home_from")
        env = dict(self.env, SENSITIVITY_LORA_FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=jobs)
        env.pop("SENSITIVITY_LORA_SKIP_CUDA", None)
        env.pop("SENSITIVITY_LORA_SKIP_EXT", None)
        extra_inc = self._wheel_cuda_includes()
        if root:
            env["CUDA_HOME"] = root
            env["PATH"] = os.pathsep.join([str(Path(root, "bin")), env["PATH"]])
        if extra_inc:
            env["CPATH"] = os.pathsep.join(extra_inc + ([env["CPATH"]] if env.get("CPATH") else []))
        build_temp = Path(tempfile.mkdtemp(prefix="sl-gpu-build-"))
        cmd = [self.py, str(ROOT / "scripts" / "gpu_check.py"), "--build-driver", "--jobs", jobs, "--",
               str(ROOT / "setup.py"), "build_ext", "--inplace", "--force", "--build-temp", str(build_temp)]
        shown = {k: env[k] for k in ("SENSITIVITY_LORA_FORCE_CUDA", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "CUDA_HOME",
                                     "CPATH") if k in env}
        st["result"] = {"arch": arch, "arch_from": arch_from, "jobs": int(jobs), "cuda_home": root,
                        "cuda_home_from": how, "ninja": self.machine.get("ninja"), "env": shown,
                        "wheel_includes": extra_inc}
        if self.dry:
            line = " ".join(f"{k}={shlex.quote(v)}" for k, v in shown.items()) + " " + shlex.join(cmd)
            st["command"] = line
            say(f"build (dry run, not run): {line}")
            rc, secs, cut = self.run_cmd(st, [self.py, "setup.py", "--name"], min(limit, 60))
            st["result"]["setup_py_parses"] = rc == 0
            notes = []
            if not root:
                notes.append(f"nvcc not found here ({how}): a GPU run without nvcc stops at this stage")
            st["result"]["notes"] = notes
            shutil.rmtree(build_temp, ignore_errors=True)
            if cut or rc != 0:
                st.update(status="failed", error=f"`setup.py --name` failed (exit {rc}): "
                                                 f"{last_error_line(self.out / st['log'])}")
            else:
                st["status"] = "ok"
            return
        if not root:
            st.update(status="failed", error=f"BUILD FAILED: {how}; set CUDA_HOME to the toolkit root")
            return
        echo = lambda line: bool(re.match(r"\s*\[\d+/\d+\]|.*(error|Error|warning: unused|FAILED)", line))  # noqa: E731
        build_limit = max(limit - 20, 0.8 * limit)  # the rest: loading the built library
        rc, secs, cut = self.run_cmd(st, cmd, build_limit, env=env, echo=echo)
        shutil.rmtree(build_temp, ignore_errors=True)
        if cut:
            st.update(status="timeout", error=f"BUILD FAILED: the build ran past {build_limit:.0f} s (MAX_JOBS={jobs}, "
                                              f"ninja={self.machine.get('ninja')})")
            return
        if rc != 0:
            st.update(status="failed", error=f"BUILD FAILED (exit {rc}): {last_error_line(self.out / st['log'])}")
            return
        # the built library must load and register the CUDA kernels
        code = ("import json; from sensitivity_lora import ops; "
                "print('GPU_CHECK_OPS ' + json.dumps({b: {op: (ops.available(op, b) or ops.unavailable_reason(op, b)) "
                "for op in ops.OP_NAMES} for b in ('cpu', 'cuda', 'triton')}))")
        rc, out = probe(self.py, code, self.env, timeout=max(10.0, min(90.0, limit - secs)))
        found = [line for line in out.splitlines() if line.startswith("GPU_CHECK_OPS ")]
        if rc != 0 or not found:
            st.update(status="failed", error=f"BUILD FAILED: the built extension does not load: {out[-400:]}")
            return
        table = json.loads(found[-1].split(" ", 1)[1])
        st["result"]["backends"] = table
        missing = {op: table["cuda"][op] for op in CUDA_OPS if table["cuda"][op] is not True}
        if missing:
            st.update(status="failed", error=f"BUILD FAILED: the extension built but has no CUDA kernels for {missing}")
            return
        st["status"] = "ok"

    def _wheel_cuda_includes(self) -> list[str]:
        """Header folders of the nvidia-* wheels torch depends on (cuBLAS, cuSPARSE, ...), if any: a
        toolkit without those headers finds them there (CPATH is searched after -I)."""
        rc, out = probe(self.py, "import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))", self.env, 30)
        if rc != 0 or not out:
            return []
        base = Path(out.splitlines()[-1].strip()) / "nvidia"
        dirs = [base / "cu13" / "include"] + sorted(base.glob("*/include"))
        return list(dict.fromkeys(str(d) for d in dirs if d.is_dir()))

    def _pytest(self, st: dict, limit: float, files: list[str], extra: list[str], env: dict | None = None,
                junit: str | None = None, echo: Callable | None = None) -> tuple[int | None, bool]:
        cmd = [self.py, "-m", "pytest", *files, "-o", "addopts=", "-o", "console_output_style=classic",
               "-p", "no:cacheprovider", "-p", "no:randomly", "-p", "gpu_check",
               "--per-test-limit", f"{PER_TEST_LIMIT_S:g}", "-rfE", "-v", "--durations=5", *extra]
        if junit:
            cmd += ["--junitxml", str(self.out / junit)]
        if echo is None:
            echo = TestEcho()
        rc, secs, cut = self.run_cmd(st, cmd, limit, env=env, echo=echo)
        return rc, cut

    def _needs_pytest(self, st: dict) -> bool:
        if self.machine and self.machine.get("pytest") is None:
            st.update(status="failed", error=f"pytest is not installed for {self.py}: the op tests cannot run "
                                             "(the benchmarks still do)")
            return False
        return True

    def _test_part(self, st: dict, name: str, limit: float, files: list[str], extra: list[str],
                   env: dict | None = None, collect_only: bool = False) -> dict:
        """One pytest run of a test stage; its counts (JUnit, else the -v log lines) and status."""
        log = self.out / st["log"]
        offset = log.stat().st_size if log.exists() else 0
        part = {"name": name, "selection": shlex.join(files + extra), "status": None, "error": None,
                "seconds": None, "limit_s": round(limit, 1)}
        if limit < 3:
            part.update(status="timeout", error="not started: no time left in the stage")
            return part
        start = time.monotonic()
        if collect_only:
            rc, cut = self._pytest(st, limit, files, ["--collect-only", "-q", *extra],
                                   echo=lambda line: "::" not in line and line.strip() != "")
            text = log.read_text(errors="replace")[offset:]
            counts = [int(a or b) for a, b in re.findall(r"(\d+)(?:/\d+)? tests? collected|(\d+) tests? selected", text)]
            part.update(exit_code=rc, collected=counts[-1] if counts else None, seconds=round(time.monotonic() - start, 2))
            if cut:
                part.update(status="timeout", error=f"collection ran past {limit:.0f} s")
            elif rc != 0 or not counts:
                part.update(status="failed", error=f"collection failed (exit {rc}): {last_error_line(log)}")
            else:
                part["status"] = "ok"
            return part
        junit = f"junit-{st['name']}-{name}.xml"
        (self.out / junit).unlink(missing_ok=True)
        rc, cut = self._pytest(st, limit, files, extra, env=env, junit=junit)
        part["seconds"] = round(time.monotonic() - start, 2)
        summary = junit_summary(self.out / junit) or log_summary(log, offset)
        part.update(exit_code=rc, **summary)
        if cut:
            part.update(status="timeout", error=f"cut at {limit:.0f} s after {summary['tests']} tests "
                                                f"(running: {summary.get('last_test_started')})")
        elif summary.get("from_log") and rc not in (0, 1):
            part.update(status="failed", error=f"pytest exit {rc}, no JUnit report: {last_error_line(log)}")
        elif rc == 5 or summary["tests"] == 0:
            part.update(status="failed", error="no tests ran")
        elif rc != 0 or summary["failures"] or summary["errors"]:
            first = (summary["failed_tests"] or [{"test": "?"}])[0]["test"]
            part.update(status="failed", error=f"{summary['failures']} failed, {summary['errors']} errors of "
                                               f"{summary['tests']} (first: {first})")
        elif summary["passed"] == 0:
            part.update(status="skipped", error="every test was skipped: " +
                        "; ".join(r["reason"] for r in summary["skip_reasons"][:3]))
        else:
            part["status"] = "ok"
        return part

    def _test_stage(self, st: dict, limit: float, runs: list[tuple]) -> None:
        """Run the parts one after another within the stage's limit, then sum them up."""
        deadline = time.monotonic() + limit
        parts = []
        for name, files, extra, env, collect_only in runs:
            part = self._test_part(st, name, deadline - time.monotonic(), files, extra, env, collect_only)
            parts.append(part)
            say(f"{st['name']} [{name}]: {part['status']}" + (f" — {part['error']}" if part["error"] else "")
                + (f" ({part.get('passed')} passed, {part.get('failures')} failed, {part.get('errors')} errors, "
                   f"{part.get('skipped')} skipped)" if "passed" in part else ""))
            st["result"] = {"parts": parts}
            self.write()
        totals = {k: sum(p.get(k) or 0 for p in parts) for k in ("tests", "passed", "failures", "errors", "skipped")}
        st["result"] = {**totals, "parts": parts}
        statuses = {p["status"] for p in parts}
        problems = "; ".join(f"{p['name']}: {p['error']}" for p in parts if p["status"] in ("failed", "timeout"))
        if "failed" in statuses:
            st.update(status="failed", error=problems)
        elif "timeout" in statuses:
            st.update(status="timeout", error=problems)
        elif statuses == {"skipped"}:
            st.update(status="skipped", error="; ".join(f"{p['name']}: {p['error']}" for p in parts))
        else:
            st["status"] = "ok"

    def stage_tests_ops(self, st: dict, limit: float) -> None:
        if not self._needs_pytest(st):
            return
        files = ["tests/test_ops_backends.py"]
        if self.dry:
            runs = [("collect", files, [], None, True)]
            if self.machine.get("triton") is not None:
                # the triton cases on CPU tensors in the Triton interpreter (a few of each op)
                env = dict(self.env, TRITON_INTERPRET="1", SL_TRITON_ON_CPU="1")
                runs.append(("triton-interpreter", files, ["-k", TRITON_SMOKE], env, False))
            self._test_stage(st, limit, runs)
            return
        # One run per backend, so that a slow one (Triton compiles every specialisation on first
        # use) cannot hide the others' results.
        # GPU backends first; the cpu backend (fast, and already tested in CI) last.
        self._test_stage(st, limit, [("cuda", files, ["-k", "cuda"], None, False),
                                     ("triton", files, ["-k", "triton"], None, False),
                                     ("cpu", files, ["-k", "not cuda and not triton"], None, False)])

    def stage_tests_triton(self, st: dict, limit: float) -> None:
        if not self._needs_pytest(st):
            return
        if self.machine and self.machine.get("triton") is None:
            st.update(status="skipped", error=f"triton is not installed ({self.machine.get('triton_error')})")
            return
        self._test_stage(st, limit, [("gpu", ["tests/test_triton.py"], ["-m", "gpu"], None, self.dry)])
    def _bench(self, st: dict, limit: float, stage: str, extra: list[str]) -> None:
        out = self.out / f"bench_{stage}.json"
        if self.dry:
            args = ["--device", "cpu", "--tiny", "--backends", "reference", "cpu"]
        else:
            args = ["--device", "cuda", "--backends", "cuda", "triton"]
        self._json_stage(st, limit, [self.py, "benchmarks/bench_gpu.py", "--stage", stage, *args, *extra], out)

    def _json_stage(self, st: dict, limit: float, cmd: list[str], out: Path) -> None:
        """Run ``cmd --json out``; the stage's result is that JSON, its status from the exit code and the cut."""
        out.unlink(missing_ok=True)
        rc, secs, cut = self.run_cmd(st, [*cmd, "--json", str(out)], limit)
        try:
            st["result"] = json.loads(out.read_text())
        except (OSError, ValueError):
            st["result"] = None
        if cut:
            st.update(status="timeout", error=f"cut at the stage limit of {limit:.0f} s"
                      + (" (what it measured before is in the result)" if st["result"] else ""))
        elif rc != 0:
            err = (st["result"] or {}).get("error") or last_error_line(self.out / st["log"])
            st.update(status="failed", error=f"exit {rc}: {err}")
        elif st["result"] is None:
            st.update(status="failed", error="the benchmark wrote no JSON")
        else:
            st["status"] = "ok"

    def stage_tests_e2e(self, st: dict, limit: float) -> None:
        self._bench(st, limit, "agree", [])
        if st["status"] == "failed" and st["result"]:
            bad = [c for c in st["result"].get("checks", []) if c.get("status") == "failed"]
            if bad:
                st["error"] = "; ".join(f"{c['backend']}: {c.get('error')}" for c in bad)[:600]

    def stage_bench_e2e(self, st: dict, limit: float) -> None:
        self._bench(st, limit, "e2e", ["--time-budget", f"{max(limit - 25, 10):.0f}"])

    def stage_bench_ops(self, st: dict, limit: float) -> None:
        self._bench(st, limit, "ops", ["--time-budget", f"{max(limit - 15, 5):.0f}"])

    def stage_bench_eig(self, st: dict, limit: float) -> None:
        args = ["--device", "cpu", "--sizes", "512", "--ks", "16"] if self.dry else ["--device", "cuda"]
        self._json_stage(st, limit, [self.py, "benchmarks/bench_eigensolver.py", *args], self.out / "bench_eig.json")


# --- the build driver ---------------------------------------------------------------------------

_JOBS = None


def _compile_child(i: int) -> None:
    compiler, todo, cc_args, extra_postargs, pp_opts = _JOBS
    obj, (src, ext) = todo[i]
    compiler._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)


def _parallel_compile(jobs: int) -> None:
    """Without ninja, torch's BuildExtension compiles one file after another. Compile the objects
    in forked children instead: torch swaps the compiler executable per file (not thread-safe), but
    each fork has its own copy of that state. Nothing is pickled (fork inherits ``_JOBS``)."""
    import multiprocessing
    import multiprocessing.connection

    try:
        from setuptools._distutils import ccompiler, errors
    except ImportError:
        from distutils import ccompiler, errors  # type: ignore[no-redef]
    base = ccompiler.CCompiler
    original = base.compile

    def compile(self, sources, output_dir=None, macros=None, include_dirs=None, debug=0, extra_preargs=None,
                extra_postargs=None, depends=None):
        global _JOBS
        try:
            macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
                output_dir, macros, include_dirs, sources, depends, extra_postargs)
            cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)
        except AttributeError:  # a distutils without these internals: the serial original
            return original(self, sources, output_dir, macros, include_dirs, debug, extra_preargs, extra_postargs,
                            depends)
        todo = [(obj, build[obj]) for obj in objects if obj in build]
        _JOBS = (self, todo, cc_args, extra_postargs, pp_opts)
        print(f"[gpu_check build] no ninja: compiling {len(todo)} objects in {jobs} forked workers", flush=True)
        ctx = multiprocessing.get_context("fork")
        pending, running, failed = list(range(len(todo))), {}, []
        while pending or running:
            while pending and len(running) < jobs:
                i = pending.pop(0)
                proc = ctx.Process(target=_compile_child, args=(i,))
                proc.start()
                running[proc.sentinel] = (proc, i)
            for sentinel in multiprocessing.connection.wait(list(running)):
                proc, i = running.pop(sentinel)
                proc.join()
                if proc.exitcode != 0:
                    failed.append(todo[i][1][0])
        if failed:
            raise errors.CompileError(f"compiling {', '.join(map(str, failed))} failed")
        return objects

    base.compile = compile


def build_driver(argv: list[str]) -> int:
    """``--build-driver [--jobs N] -- SETUP_PY ARGS``: run SETUP_PY (in its folder), compiling in parallel
    when ninja is missing."""
    import runpy

    jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
    if argv[:1] == ["--jobs"]:
        jobs, argv = int(argv[1]), argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        _parallel_compile(jobs)
    setup_py = Path(argv[0]).resolve()
    os.chdir(setup_py.parent)
    sys.argv = [str(setup_py), *argv[1:]]
    sys.path.insert(0, str(setup_py.parent))
    try:
        runpy.run_path(str(setup_py), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else (print(exc.code, file=sys.stderr) or 1)
    return 0


# --- command line -------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--build-driver"]:
        return build_driver(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="Stage plan: " + "; ".join(f"{p.name} ≤ {p.limit_s:.0f} s" for p in PLAN))
    parser.add_argument("outdir")
    parser.add_argument("--dry-run", action="store_true", help="CPU machine: run what can run without a GPU")
    parser.add_argument("--total-limit", type=float, default=TOTAL_LIMIT_S, help="seconds; no stage starts later")
    parser.add_argument("--only", default=None, help="comma-separated stages to run (the rest are skipped)")
    parser.add_argument("--stage-limit", action="append", default=[], metavar="STAGE=SECONDS",
                        help="override one stage's limit (repeatable)")
    parser.add_argument("--keep-going", action="store_true", help="run the later stages even when the build fails")
    parser.add_argument("--python", default=None, help="interpreter for the stages (default: this one)")
    args = parser.parse_args(argv)
    names = [p.name for p in PLAN]
    only = set(args.only.split(",")) if args.only else None
    if only and not only <= set(names):
        parser.error(f"--only: unknown stages {sorted(only - set(names))}; stages: {', '.join(names)}")
    if only:
        only.add("env")  # every other stage needs what it finds
    limits = {}
    for item in args.stage_limit:
        name, _, value = item.partition("=")
        if name not in names:
            parser.error(f"--stage-limit: unknown stage {name!r}")
        limits[name] = float(value)
    outdir = Path(args.outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    py = args.python or sys.executable
    check = Check(outdir, args.dry_run, py, args.total_limit, only, limits, args.keep_going)

    def on_term(signum, frame):  # the wrapper's hard limit: cut the running stage, keep the JSON
        proc = Runner.current
        if proc is not None:
            kill_group(proc)
        for s in check.stages:
            if s["status"] == "running":
                s.update(status="timeout", error=f"the whole run was stopped (signal {signum})")
        check.finish()
        os._exit(124)

    signal.signal(signal.SIGTERM, on_term)
    say(f"{'dry run' if args.dry_run else 'GPU run'} in {ROOT}, python {py}, output {outdir}, "
        f"limit {args.total_limit:.0f} s")
    return check.run()


if __name__ == "__main__":
    sys.exit(main())
