"""The machine-readable benchmark results: one JSON file per table in ``benchmarks/results/``.

Every benchmark in this folder writes its measurements through :func:`write_table`;
``benchmarks/render_results.py`` turns the files into the tables of ``benchmarks/RESULTS.md``.
Schema ``sensitivity_lora.benchmark_table``, version 1::

    {
      "schema": "sensitivity_lora.benchmark_table", "version": 1,
      "benchmark": "bench_ops",            # the script that writes the file
      "table": "ops-threads2",             # the file's stem
      "title": "...",
      "columns": [{"key": "group", "label": "group", "format": "text"}, ...],
      "runs": {"a": {"source": "measured" | "transcribed", "date": "YYYY-MM-DD", "command": "...",
                     "commit": "abc1234", "machine": {...}, "load": {...}, "shared": bool, "notes": "..."}},
      # load: load_average_start/_end, other_processes_cores (cores other processes used, from
      # /proc/stat), wall_seconds; a transcribed run has load_average_range [low, high] instead
      "rows": [{"run": "a", "group": "...", "reference_ms": 1.0, ...}, ...],
      "notes": ["..."]
    }

``source`` is ``measured`` for a file written by the benchmark itself, ``transcribed`` for numbers
copied from the committed ``RESULTS.md`` of an earlier run (``commit`` is then the commit that
recorded them). Every ratio in a row is between two times of the same run. A later run of a
subset of a table (``pytest -k ...``) replaces the rows it measured and keeps the others with
their own run (:func:`write_table` with ``key``), so a table says which run each row comes from.

Column formats: ``text``, ``int``, ``f1`` .. ``f3`` (fixed decimals), ``ms`` (seconds shown as ms,
2 decimals), ``ratio`` (2 decimals), ``ratio3`` (3 decimals), ``mib`` (bytes shown as MiB, 1
decimal), ``mib0`` (0 decimals), ``s`` (seconds, 1 decimal), ``s3`` (seconds, 3 decimals).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

SCHEMA = "sensitivity_lora.benchmark_table"
VERSION = 1
ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
# Other processes using more than this many cores on average during a run: the machine was shared.
SHARED_CORES = 0.25


def results_dir() -> Path:
    """``benchmarks/results/``, or ``$SL_BENCH_RESULTS_DIR`` (e.g. a scratch folder for smoke runs)."""
    return Path(os.environ.get("SL_BENCH_RESULTS_DIR") or RESULTS_DIR)


def column(key: str, label: str, fmt: str = "text") -> dict[str, str]:
    return {"key": key, "label": label, "format": fmt}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags)
    except OSError:
        pass
    return []


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _openblas_version() -> str | None:
    try:
        import scipy

        info = scipy.show_config(mode="dicts")
        blas = info.get("Build Dependencies", {}).get("blas", {})
        return f"{blas.get('name')} {blas.get('version')}".strip()
    except Exception:  # noqa: BLE001 - informative only
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, ISA flags, torch/scipy versions, torch threads, extension built."""
    info: dict[str, Any] = {"cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gib": _memory_gib(),
                            "isa": _cpu_flags(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        import scipy

        info["scipy"] = scipy.__version__
        info["scipy_blas"] = _openblas_version()
    except ImportError:
        pass
    try:
        from sensitivity_lora import ops

        info["cpu_backend_built"] = bool(ops.available("accumulate_xtx", "cpu"))
    except Exception:  # noqa: BLE001
        info["cpu_backend_built"] = False
    return info


def git_commit() -> str | None:
    """Short HEAD commit, with ``+dirty`` when the working tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def command_line() -> str:
    """The command that is running, as typed (pytest's or the script's argv, with the benchmark env)."""
    env = " ".join(f"{k}={os.environ[k]}" for k in ("SL_BENCH_FULL", "SL_BENCH_SMALL", "OMP_NUM_THREADS",
                                                    "OPENBLAS_NUM_THREADS") if k in os.environ)
    argv = list(sys.argv)
    if argv and argv[0].endswith(("pytest", "pytest/__main__.py", "py.test")):
        argv = ["python", "-m", "pytest"] + argv[1:]
    elif argv:
        argv = ["python", os.path.relpath(argv[0], ROOT) if os.path.isabs(argv[0]) else argv[0]] + argv[1:]
    return " ".join(x for x in [env, shlex.join(argv)] if x)


def _busy_jiffies() -> int | None:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        return user + nice + system + irq + softirq + steal
    except (OSError, ValueError, IndexError):
        return None


class LoadMonitor:
    """Load average at start and end, and how many cores *other* processes used meanwhile.

    The last is (all CPU time the kernel counted − this process's own, children included) / wall
    time, from /proc/stat: a benchmark's own threads raise the load average, this does not count them.
    """

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.load0 = os.getloadavg()
        self.busy0 = _busy_jiffies()
        self.own0 = self._own()

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        load1 = os.getloadavg()
        busy1 = _busy_jiffies()
        out: dict[str, Any] = {"load_average_start": round(self.load0[0], 2), "load_average_end": round(load1[0], 2),
                               "wall_seconds": round(wall, 1)}
        if busy1 is not None and self.busy0 is not None and wall > 0:
            ticks = os.sysconf("SC_CLK_TCK")
            system_cpu = (busy1 - self.busy0) / ticks
            other = max(0.0, system_cpu - (self._own() - self.own0)) / wall
            out["other_processes_cores"] = round(other, 2)
        return out


def shared(load: dict[str, Any]) -> bool:
    """Whether other processes used the machine during the run (see :data:`SHARED_CORES`)."""
    other = load.get("other_processes_cores")
    if other is None:  # no /proc/stat: fall back on the load average against the core count
        return max(load["load_average_start"], load["load_average_end"]) > (os.cpu_count() or 1)
    return other > SHARED_CORES


def new_run(load: dict[str, Any], command: str | None = None, notes: str = "") -> dict[str, Any]:
    """The ``runs`` entry of a run measured now."""
    return {"source": "measured", "date": datetime.date.today().isoformat(), "command": command or command_line(),
            "commit": git_commit(), "machine": machine_info(), "load": load, "shared": shared(load), "notes": notes}


def _run_id(existing: Iterable[str]) -> str:
    taken = set(existing)
    for i in range(26 * 27):
        name = chr(97 + i % 26) * (1 + i // 26)
        if name not in taken:
            return name
    raise RuntimeError("too many runs in one table")


def write_table(name: str, *, benchmark: str, title: str, columns: Sequence[dict[str, str]],
                rows: Sequence[dict[str, Any]], run: dict[str, Any], key: str | None = None,
                notes: Sequence[str] = (), folder: Path | None = None, quiet: bool = False) -> Path:
    """Write ``<folder>/<name>.json``; with ``key``, rows of an existing file whose ``key`` this run did
    not measure are kept (with their own run), else the file is replaced. Returns the path."""
    folder = folder or results_dir()
    path = folder / f"{name}.json"
    runs: dict[str, dict[str, Any]] = {}
    kept: list[dict[str, Any]] = []
    if key is not None and path.exists():
        old = json.loads(path.read_text())
        if old.get("schema") == SCHEMA and [c["key"] for c in old.get("columns", [])] == [c["key"] for c in columns]:
            measured = {r[key] for r in rows}
            kept = [r for r in old["rows"] if r.get(key) not in measured]
            runs = {k: v for k, v in old["runs"].items() if any(r["run"] == k for r in kept)}
    run_id = _run_id(runs)
    runs[run_id] = run
    new_rows = kept + [{"run": run_id, **r} for r in rows]
    if key is not None:
        new_rows.sort(key=lambda r: str(r.get(key)))
    data = {"schema": SCHEMA, "version": VERSION, "benchmark": benchmark, "table": name, "title": title,
            "columns": list(columns), "runs": runs, "rows": new_rows, "notes": list(notes)}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(dumps(data))
    os.replace(tmp, path)
    if not quiet:
        print(f"wrote {path}")
    return path


def dumps(data: dict[str, Any]) -> str:
    """The file's text: one line per column, run and row, so that a new run gives a readable diff."""
    def one(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    parts = []
    for k, v in data.items():
        if k in ("columns", "rows", "notes") and isinstance(v, list):
            inner = ",\n  ".join(one(x) for x in v)
            parts.append(f' {one(k)}: [\n  {inner}\n ]' if v else f' {one(k)}: []')
        elif k == "runs":
            inner = ",\n  ".join(f"{one(rk)}: {one(rv)}" for rk, rv in v.items())
            parts.append(f' {one(k)}: {{\n  {inner}\n }}')
        else:
            parts.append(f" {one(k)}: {one(v)}")
    text = "{\n" + ",\n".join(parts) + "\n}\n"
    json.loads(text)  # the layout must stay valid JSON
    return text


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b to 4 decimals (None when either is missing)."""
    return round(a / b, 4) if a is not None and b else None
