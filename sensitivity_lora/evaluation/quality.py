"""The comparison at tuned learning rates: each method's rate picked on the validation split, then its
seeds on the held-out test split, paired by seed against uniform LoRA and against the best peer.

Records come from ``sensitivity-lora evaluate lm --lr A B C ... --n-val N --split validation`` (the
grid) and ``--split test`` (the seeds at the chosen rates); both carry ``lr``, ``split`` and ``n_val``.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from .formatting import mean_std, method_order, plus_minus

# The field's methods (PEFT's own implementations), against which "best peer" is taken.
PEERS = frozenset({"eva", "eva-uniform", "pissa", "olora", "loraga", "corda-ipm", "corda-kpm", "corda-ipm-cov",
                   "rslora", "adalora"})

HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "perplexity": False}
PRIMARY = {"classification": "accuracy", "causal_lm": "perplexity"}


def _score(task: str) -> str:
    return PRIMARY[task]


def _better(task: str, a: float, b: float) -> bool:
    return a > b if HIGHER_IS_BETTER[_score(task)] else a < b


def lr_grid(records: list[dict[str, Any]], task: str, avg_rank: int) -> dict[str, dict[float, list[float]]]:
    """{method: {lr: [validation scores over seeds]}}."""
    grid: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if (r.get("split") == "validation" and r["task"] == task and r["avg_rank"] == avg_rank
                and r.get("lr") is not None and r["method"] != "base"):
            grid[r["method"]][float(r["lr"])].append(float(r[_score(task)]))
    return grid


def tuned_lrs(records: list[dict[str, Any]], task: str, avg_rank: int) -> dict[str, float]:
    """Each method's learning rate with the best mean validation score (ties: the smaller rate)."""
    out = {}
    for method, by_lr in lr_grid(records, task, avg_rank).items():
        best = None
        for lr in sorted(by_lr):
            mean = statistics.fmean(by_lr[lr])
            if best is None or _better(task, mean, best[1]):
                best = (lr, mean)
        out[method] = best[0]
    return out


def lr_grid_table(records: list[dict[str, Any]], task: str, avg_rank: int) -> str:
    """Method × learning rate, validation score (mean over the seeds run there); the best rate in bold,
    and how much worse the method's worst rate is than its best (its dependence on the rate)."""
    grid = lr_grid(records, task, avg_rank)
    if not grid:
        return ""
    lrs = sorted({lr for by_lr in grid.values() for lr in by_lr})
    best = tuned_lrs(records, task, avg_rank)
    head = ("| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | worst − best |\n|---"
            + "|---" * (len(lrs) + 1) + "|")
    lines = []
    for method in sorted(grid, key=method_order):
        cells, means = [], []
        for lr in lrs:
            scores = grid[method].get(lr)
            if not scores:
                cells.append("")
                continue
            mean = statistics.fmean(scores)
            means.append(mean)
            text = f"{mean:.2f}" + (f" ({len(scores)})" if len(scores) > 1 else "")
            cells.append(f"**{text}**" if lr == best[method] else text)
        spread = f"{max(means) - min(means):.2f}" if len(means) > 1 else "—"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {spread} |")
    return "\n".join([head, *lines])


def tuned_rows(records: list[dict[str, Any]], task: str, avg_rank: int,
               lrs: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per method: its test runs at its tuned rate (``lrs``, default from the validation grid;
    a method without one keeps its only tested rate), mean ± std, and paired (same seed) differences
    against uniform LoRA and against the best peer (the peer with the best mean)."""
    lrs = dict(tuned_lrs(records, task, avg_rank) if lrs is None else lrs)
    tested: dict[str, dict[float, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if (r.get("split", "test") == "test" and r["task"] == task and r["avg_rank"] == avg_rank
                and r["method"] != "base"):
            tested[r["method"]][r.get("lr")][r["seed"]] = r
    runs: dict[str, tuple[float | None, dict[int, dict]]] = {}
    for method, by_lr in tested.items():
        lr = lrs.get(method)
        if lr is None and len(by_lr) == 1:
            lr = next(iter(by_lr))
        if lr in by_lr:
            runs[method] = (lr, by_lr[lr])
    score = _score(task)
    means = {m: statistics.fmean(r[score] for r in seeds.values()) for m, (_, seeds) in runs.items()}
    peers = [m for m in runs if m in PEERS]
    best_peer = None
    for m in peers:
        if best_peer is None or _better(task, means[m], means[best_peer]):
            best_peer = m

    def paired(method: str, reference: str | None) -> tuple[float, float] | None:
        if reference is None or reference == method or reference not in runs:
            return None
        ref = runs[reference][1]
        diffs = [r[score] - ref[s][score] for s, r in runs[method][1].items() if s in ref]
        return mean_std(diffs) if diffs else None

    rows = []
    for method in sorted(runs, key=method_order):
        lr, seeds = runs[method]
        values = [r[score] for r in seeds.values()]
        rows.append({
            "method": method, "lr": lr, "n_seeds": len(values), score: mean_std(values),
            "vs_uniform": paired(method, "uniform"), "vs_best_peer": paired(method, best_peer),
            "best_peer": best_peer, "peer": method in PEERS,
            "setup_seconds": statistics.fmean(r.get("setup_seconds", math.nan) for r in seeds.values()),
            "lora_params": statistics.fmean(r.get("lora_params", math.nan) for r in seeds.values()),
        })
    return rows


def tuned_table(records: list[dict[str, Any]], task: str, avg_rank: int,
                lrs: dict[str, float] | None = None) -> str:
    rows = tuned_rows(records, task, avg_rank, lrs)
    if not rows:
        return ""
    score = _score(task)
    best_peer = rows[0]["best_peer"]
    head = (f"| method | lr | seeds | test {score} | Δ vs uniform | Δ vs best peer ({best_peer or '—'}) | "
            "setup s | trainable params |\n|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['method']}{' (peer)' if r['peer'] else ''} | {r['lr']:g} | {r['n_seeds']} | {plus_minus(r[score])} | "
             f"{plus_minus(r['vs_uniform'], sign=True)} | {plus_minus(r['vs_best_peer'], sign=True)} | {r['setup_seconds']:.1f} | "
             f"{r['lora_params']:,.0f} |" for r in rows]
    return "\n".join([head, *lines])
