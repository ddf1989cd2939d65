"""How fast each method converges, from the curves of its runs (``loss_curve``, ``eval_curve``).

Two questions, for every (task, average rank) with curves:

- **Steps to a fixed training loss.** The loss of a step is noisy (one batch), so the curve is a
  trailing mean over ``window`` steps. The fixed targets are shared by every run compared: L* is
  the highest of the runs' lowest smoothed losses (the level every run reaches), L₀ the mean
  smoothed loss over the first window; a target at fraction f is L₀ − f·(L₀ − L*), so f = 1 is
  L* and f = 0.5 halfway there. A run's steps to a target are the first step whose smoothed loss
  is at or below it.
- **Steps to a fixed held-out score**, on the periodic held-out evaluations: the target is the
  lowest of the runs' best scores (accuracy; for perplexity the highest of the lowest), again
  reached by every run; resolution is the evaluation interval.

Paired differences (same seed) are against ``reference`` (AdaLoRA by default: HyperAdaLoRA's
claim is that it converges faster than AdaLoRA at the same quality). Only runs that trained on
the reference's batches (same plan digest at the same seed) are compared: a training loss on
other rows (TsqLoRA's quality sampling draws its own) is not the same quantity.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

HELD_OUT = {"classification": ("accuracy", True), "causal_lm": ("perplexity", False)}  # metric, higher is better
FRACTIONS = (0.5, 0.9, 1.0)


def smoothed(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean: element i is the mean of values[max(0, i − window + 1) : i + 1]."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def first_step_at_or_below(curve: Sequence[float], target: float) -> int | None:
    """1-based step of the first value ≤ target (None if never)."""
    return next((i + 1 for i, v in enumerate(curve) if v <= target), None)


def first_eval_reaching(points: Sequence[dict], metric: str, target: float, higher_is_better: bool) -> int | None:
    for p in points:
        if (p[metric] >= target) if higher_is_better else (p[metric] <= target):
            return int(p["step"])
    return None


def same_batches(records: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """The runs with a loss curve that saw the same batches as the ``reference`` run with a curve at
    their task, rank and seed (none where the reference has no curve there)."""
    plans = {(r["task"], r["avg_rank"], r["seed"]): r.get("plan_digest") for r in records
             if r["method"] == reference and r.get("loss_curve")}
    return [r for r in records if r.get("loss_curve") and (r["task"], r["avg_rank"], r["seed"]) in plans
            and plans[(r["task"], r["avg_rank"], r["seed"])] == r.get("plan_digest")]


def _mean_std(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def convergence_rows(records: list[dict[str, Any]], window: int = 10, reference: str = "adalora",
                     fractions: Sequence[float] = FRACTIONS) -> list[dict[str, Any]]:
    """One row per (task, avg_rank, method) among the runs with a ``loss_curve``: steps to each shared
    training-loss target and to the shared held-out target (mean ± std over seeds, paired differences to
    ``reference``), time per step and parameter counts."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in same_batches(records, reference):
        groups[(r["task"], r["avg_rank"])].append(r)
    rows = []
    for (task, avg_rank), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        curves = {id(r): smoothed(r["loss_curve"], window) for r in runs}
        start = statistics.fmean(c[min(window, len(c)) - 1] for c in curves.values())
        floor = max(min(c) for c in curves.values())
        targets = {f: start - f * (start - floor) for f in fractions}
        metric, higher = HELD_OUT[task]
        with_eval = [r for r in runs if r.get("eval_curve")]
        best = [(max if higher else min)(p[metric] for p in r["eval_curve"]) for r in with_eval]
        held_target = ((min if higher else max)(best)) if best else None

        def reached(r: dict) -> dict[str, int | None]:
            out: dict[str, int | None] = {f"loss@{f:g}": first_step_at_or_below(curves[id(r)], t)
                                          for f, t in targets.items()}
            if held_target is not None and r.get("eval_curve"):
                out[f"{metric}@target"] = first_eval_reaching(r["eval_curve"], metric, held_target, higher)
            return out

        per_run = {id(r): reached(r) for r in runs}
        by_method: dict[str, list[dict]] = defaultdict(list)
        for r in runs:
            by_method[r["method"]].append(r)
        ref_by_seed = {r["seed"]: r for r in by_method.get(reference, [])}
        for method, mine in sorted(by_method.items()):
            row: dict[str, Any] = {"task": task, "avg_rank": avg_rank, "method": method, "n_seeds": len(mine),
                                   "targets": {f"loss@{f:g}": t for f, t in targets.items()},
                                   "held_out_target": held_target, "held_out_metric": metric}
            for key in dict.fromkeys(k for r in mine for k in per_run[id(r)]):
                # a run without held-out points has no entry for them: it is left out, not counted as a miss
                steps = [per_run[id(r)][key] for r in mine if key in per_run[id(r)]]
                row[key] = _mean_std([s for s in steps if s is not None])
                row[f"{key}_missed"] = sum(s is None for s in steps)
                pairs = [(per_run[id(r)].get(key), per_run[id(ref_by_seed[r["seed"]])].get(key))
                         for r in mine if r["seed"] in ref_by_seed]
                paired = [a - b for a, b in pairs if a is not None and b is not None]
                row[f"{key}_vs_{reference}"] = _mean_std(paired) if method != reference else None
            row["final_held_out"] = _mean_std([r[metric] for r in mine])
            row["seconds_per_step"] = _mean_std([r["train_seconds"] / r["steps"] for r in mine])
            row["trainable_params_at_start"] = statistics.fmean(r["trainable_params_at_start"] for r in mine)
            counts = [r["parameter_counts"] for r in mine if "parameter_counts" in r]
            if counts:
                row["parameter_counts"] = counts[0]
            rows.append(row)
    return rows


def _steps(pair: tuple[float, float] | None, missed: int, sign: bool = False) -> str:
    if pair is None:
        return "—" if not missed else f"never ({missed})"
    text = f"{pair[0]:+.1f} ± {pair[1]:.1f}" if sign else f"{pair[0]:.1f} ± {pair[1]:.1f}"
    return text + (f" ({missed} never)" if missed else "")


def convergence_table(rows: list[dict[str, Any]], task: str, avg_rank: int, reference: str = "adalora") -> str:
    rows = [r for r in rows if r["task"] == task and r["avg_rank"] == avg_rank]
    if not rows:
        return ""
    keys = [k for k in rows[0] if k.startswith("loss@") and not k.endswith(("_missed", f"_vs_{reference}"))]
    metric = rows[0]["held_out_metric"]
    held = f"{metric}@target"
    has_held = any(held in r for r in rows)
    targets = rows[0]["targets"]
    scale = 100 if metric == "accuracy" else 1
    head = ["method", "seeds"] + [f"steps to loss {targets[k]:.3f} ({k[5:]}), Δ vs {reference}" for k in keys]
    if has_held:
        target = rows[0]["held_out_target"] * scale
        head.append(f"steps to held-out {metric} {target:.2f}, Δ vs {reference}")
    head += [f"final {metric}", "s / step", "trainable params at start"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["n_seeds"])]
        for k in keys + ([held] if has_held else []):
            cells.append(f"{_steps(r.get(k), r.get(f'{k}_missed', 0))}; "
                         f"{_steps(r.get(f'{k}_vs_{reference}'), 0, sign=True)}")
        final = r["final_held_out"]
        cells += [f"{final[0] * scale:.2f} ± {final[1] * scale:.2f}", f"{r['seconds_per_step'][0]:.2f}",
                  f"{r['trainable_params_at_start']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    counts = [r for r in rows if "parameter_counts" in r]
    notes = [f"{r['method']}: hypernetwork {r['parameter_counts']['hypernetwork']:,} parameters, "
             f"generated P Λ Q {r['parameter_counts']['generated']:,} values" for r in counts]
    return "\n".join(lines + ([""] + notes if notes else []))


def plot_curves(records: list[dict[str, Any]], task: str, avg_rank: int, path: Path, window: int = 10,
                reference: str = "adalora") -> Path | None:
    """Training loss (trailing mean) and the held-out metric against the step, mean over seeds with the
    seeds' range shaded, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in same_batches(records, reference) if r["task"] == task and r["avg_rank"] == avg_rank]
    if not runs:
        return None
    metric, _ = HELD_OUT[task]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_method[r["method"]].append(r)
    for method, mine in sorted(by_method.items()):
        curves = [smoothed(r["loss_curve"], window) for r in mine]
        n = min(len(c) for c in curves)
        steps = list(range(1, n + 1))
        cols = list(zip(*(c[:n] for c in curves)))
        line, = axes[0].plot(steps, [statistics.fmean(c) for c in cols], label=f"{method} (n = {len(mine)})")
        axes[0].fill_between(steps, [min(c) for c in cols], [max(c) for c in cols], alpha=0.15,
                             color=line.get_color())
        evals = [r["eval_curve"] for r in mine if r.get("eval_curve")]
        if evals:
            k = min(len(e) for e in evals)
            x = [evals[0][i]["step"] for i in range(k)]
            vals = [[e[i][metric] for e in evals] for i in range(k)]
            axes[1].plot(x, [statistics.fmean(v) for v in vals], marker="o", ms=3, color=line.get_color(),
                         label=method)
            axes[1].fill_between(x, [min(v) for v in vals], [max(v) for v in vals], alpha=0.15,
                                 color=line.get_color())
    axes[0].set(xlabel="optimiser step", ylabel=f"training loss (mean of {window} steps)", yscale="log",
                title=f"{task}, r̄ = {avg_rank}: training loss")
    axes[1].set(xlabel="optimiser step", ylabel=f"held-out {metric}", title=f"held-out {metric}")
    if metric == "perplexity":
        axes[1].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
