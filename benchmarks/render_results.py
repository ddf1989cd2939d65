"""Regenerate the generated parts of the result documents from the machine-readable results.

    python benchmarks/render_results.py            # rewrite benchmarks/RESULTS.md and docs/results.md
    python benchmarks/render_results.py --check    # exit 1 if a document is out of date
    python benchmarks/render_results.py FILE.md    # only these documents

Two kinds of marked blocks are replaced, everything between the markers is generated:

    <!-- table: NAME -->            benchmarks/results/NAME.json (schema in benchmarks/results_io.py):
    <!-- end table -->              the machine, the date, the command(s) and the table

    <!-- include: PATH [shift=N] --> a file relative to the document (e.g. the tables.md that
    <!-- end include -->             ``sensitivity-lora evaluate report`` writes), headings N levels deeper
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import RESULTS_DIR, ROOT, SCHEMA  # noqa: E402

DOCUMENTS = (ROOT / "benchmarks" / "RESULTS.md", ROOT / "docs" / "results.md")
BLOCK = re.compile(r"(<!-- (table|include): ([^>]*?) -->\n)(.*?)(<!-- end \2 -->)", re.S)


def fmt(value: Any, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "text":
        return str(value)
    if kind == "int":
        return f"{int(value):,}"
    if kind in ("f0", "f1", "f2", "f3"):
        return f"{float(value):.{kind[1]}f}"
    if kind == "ms":
        return f"{float(value) * 1e3:.2f}"
    if kind == "ratio":
        return f"{float(value):.2f}"
    if kind == "ratio3":
        return f"{float(value):.3f}"
    if kind == "mib":
        return f"{float(value) / 2**20:.1f}"
    if kind == "mib0":
        return f"{float(value) / 2**20:.0f}"
    if kind == "s":
        return f"{float(value):.1f}"
    if kind == "s3":
        return f"{float(value):.3f}"
    raise ValueError(f"unknown column format {kind!r}")


def machine_line(machine: dict[str, Any]) -> str:
    if machine.get("description"):
        text = machine["description"]
    else:
        parts = [machine.get("cpu", "?")]
        if machine.get("isa"):
            isa = list(machine["isa"])
            if not any(f.startswith("amx") for f in isa):
                isa.append("no AMX")
            parts[0] += f" ({', '.join(isa)})"
        parts.append(f"{machine.get('cores')} cores")
        if machine.get("memory_gib"):
            parts.append(f"{machine['memory_gib']:.0f} GiB")
        text = ", ".join(parts)
    extra = []
    if machine.get("torch"):
        extra.append(f"torch {machine['torch']}")
    if machine.get("torch_threads"):
        extra.append(f"{machine['torch_threads']} thread{'s' if machine['torch_threads'] != 1 else ''}")
    if machine.get("scipy_blas"):
        extra.append(f"scipy BLAS {machine['scipy_blas']}")
    if "cpu_backend_built" in machine and not machine["cpu_backend_built"]:
        extra.append("compiled extension not built")
    return text + ("; " + ", ".join(extra) if extra else "")


def state_line(run: dict[str, Any]) -> str:
    load = run.get("load") or {}
    bits = []
    if "load_average_range" in load:  # transcribed runs: the range the record gives
        a, b = load["load_average_range"]
        bits.append(f"load average {a:g}–{b:g}" if a != b else f"load average {a:g}")
    elif "load_average_start" in load:
        a, b = load["load_average_start"], load.get("load_average_end", load["load_average_start"])
        bits.append(f"load average {a:g} → {b:g}" if a != b else f"load average {a:g}")
    if load.get("other_processes_cores") is not None:
        bits.append(f"other processes used {load['other_processes_cores']:.2f} cores on average")
    state = "**shared with other jobs**" if run.get("shared") else "idle"
    return state + (f" ({', '.join(bits)})" if bits else "")


def run_text(run: dict[str, Any], label: str | None, with_machine: bool) -> list[str]:
    head = f"Run {label}: " if label else "Run: "
    source = "" if run.get("source") == "measured" else " (transcribed from the committed RESULTS.md)"
    if run.get("complete") is False:
        source += " (**incomplete**: the run stopped before its last measurement)"
    commit = f", code at `{run['commit']}`" if run.get("commit") else ""
    machine = f"; {machine_line(run.get('machine', {}))}" if with_machine else ""
    lines = [f"{head}{run['date']}{commit}{source}{machine}; machine {state_line(run)}.",
             "", f"    {run['command']}"]
    if run.get("notes"):
        lines += ["", run["notes"]]
    return lines


def render_table(data: dict[str, Any]) -> str:
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{data.get('table')}: not a {SCHEMA} file")
    runs = data["runs"]
    several = len(runs) > 1
    columns = data["columns"]
    out: list[str] = []
    machines = {machine_line(run.get("machine", {})) for run in runs.values()}
    if len(machines) == 1:
        out += [f"Machine: {machines.pop()}.", ""]
    for label, run in runs.items():
        out += run_text(run, label if several else None, with_machine=len(machines) > 1) + [""]
    header = (["run"] if several else []) + [c["label"] for c in columns]
    align = (["---"] if several else []) + ["---" if c["format"] == "text" else "---:" for c in columns]
    out += ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for row in data["rows"]:
        cells = ([row["run"]] if several else []) + [fmt(row.get(c["key"]), c["format"]) for c in columns]
        out.append("| " + " | ".join(cells) + " |")
    if data.get("notes"):
        out += [""] + [f"- {n}" for n in data["notes"]]
    return "\n".join(out) + "\n"


def _include(document: Path, spec: str) -> str:
    parts = spec.split()
    shift = next((int(p.split("=", 1)[1]) for p in parts[1:] if p.startswith("shift=")), 0)
    text = (document.parent / parts[0]).read_text()
    if shift:
        text = re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + shift) + " ", text, flags=re.M)
    return text.strip("\n") + "\n"


def render_document(document: Path, results: Path = RESULTS_DIR) -> str:
    text = document.read_text()

    def replace(match: re.Match) -> str:
        kind, spec = match.group(2), match.group(3).strip()
        if kind == "table":
            body = render_table(json.loads((results / f"{spec}.json").read_text()))
        else:
            body = _include(document, spec)
        return f"{match.group(1)}{body}{match.group(5)}"

    return BLOCK.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("documents", nargs="*", type=Path, help="markdown files (default: RESULTS.md, docs/results.md)")
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if a document would change")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of the table JSON files")
    args = parser.parse_args(argv)
    stale = []
    for document in args.documents or DOCUMENTS:
        new = render_document(document, args.results)
        if new != document.read_text():
            stale.append(document)
            if not args.check:
                document.write_text(new)
                print(f"rendered {document}")
    if args.check and stale:
        print("out of date: " + ", ".join(map(str, stale)) + " (run python benchmarks/render_results.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
