"""Tables (mean ± std over seeds, paired differences to uniform LoRA) and plots from results files."""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..files import read_json
from .formatting import mean_std, method_order, plus_minus

SCORES = {"classification": ("accuracy", "macro_f1"), "causal_lm": ("perplexity",)}


def load_records(folder: Path) -> list[dict[str, Any]]:
    """Every run record of the results JSON files (lists) in ``folder``."""
    from ..errors import MissingInputError

    if not folder.is_dir():
        raise MissingInputError(f"the results folder {folder} does not exist (or is not a folder); pass the folder "
                                "the evaluate runs wrote their --out files to")
    records = []
    for path in sorted(folder.glob("*.json")):
        data = read_json(path)
        if isinstance(data, list):
            records += [r for r in data if isinstance(r, dict) and r.get("task") in SCORES and "seed" in r]
    _check_one_setting(records, folder)
    return records


SETTING_FIELDS = ("model", "category")  # what the run key leaves out: one folder holds one setting


def _check_one_setting(records: list[dict[str, Any]], folder: Path) -> None:
    """Refuse a folder whose records come from several models or text domains: their runs share run keys
    and would be averaged together. Records that predate these fields are taken as they are."""
    for field in SETTING_FIELDS:
        for task in {r["task"] for r in records}:
            seen = sorted({str(r[field]) for r in records if r["task"] == task and field in r})
            if len(seen) > 1:
                raise ValueError(f"{folder} mixes {task} runs of more than one {field} ({', '.join(seen)}); keep one "
                                 f"setting per results folder (e.g. {folder}/<{field}>/) and report each on its own")


REFERENCES = ("uniform", "eva")  # paired differences are reported against these methods (plain LoRA, PEFT's EVA)


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, avg_rank, method, learning rate, split): mean ± std of each score, and the paired
    (same seed, same rate and split) differences to uniform LoRA and to PEFT's EVA."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["task"], r["avg_rank"], r["method"], r.get("lr"), r.get("split", "test"))].append(r)
    rows = []
    for (task, avg_rank, method, lr, split), runs in sorted(
            groups.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][4], kv[0][3] or 0.0, method_order(kv[0][2]))):
        row: dict[str, Any] = {"task": task, "avg_rank": avg_rank, "method": method, "n_seeds": len(runs)}
        if lr is not None:
            row.update(lr=lr, split=split)
        for score in SCORES[task]:
            row[score] = mean_std(r[score] for r in runs)
            for reference in REFERENCES:
                by_seed = {u["seed"]: u for u in groups.get((task, avg_rank, reference, lr, split), [])}
                paired = [r[score] - by_seed[r["seed"]][score] for r in runs if r["seed"] in by_seed]
                row[f"{score}_vs_{reference}"] = mean_std(paired) if paired and method != reference else None
        for key in ("rank_sum", "lora_params", "rank_max", "setup_seconds", "train_seconds"):
            if all(key in r for r in runs):
                row[key] = statistics.fmean(r[key] for r in runs)
        rows.append(row)
    return rows


def _label(row: dict[str, Any]) -> str:
    """The method, with its learning rate and split where the runs recorded them."""
    if row.get("lr") is None:
        return row["method"]
    return f"{row['method']} (lr {row['lr']:g}{', validation' if row.get('split') == 'validation' else ''})"


def results_table(rows: list[dict[str, Any]], task: str, avg_rank: int) -> str:
    """A markdown table for one task and average rank."""
    rows = [r for r in rows if r["task"] == task and r["avg_rank"] == avg_rank]
    if task == "classification":
        head = ("| method | seeds | accuracy % | Δ acc vs uniform | macro-F1 % | Δ F1 vs uniform | Σ rank | "
                "LoRA params | max rank | setup s | train s |\n|---|---|---|---|---|---|---|---|---|---|---|")
        lines = [f"| {_label(r)} | {r['n_seeds']} | {plus_minus(r['accuracy'], 100)} | "
                 f"{plus_minus(r['accuracy_vs_uniform'], 100, sign=True)} | {plus_minus(r['macro_f1'], 100)} | "
                 f"{plus_minus(r['macro_f1_vs_uniform'], 100, sign=True)} | {r.get('rank_sum', 0):.0f} | "
                 f"{r.get('lora_params', 0):,.0f} | {r.get('rank_max', 0):.0f} | {r.get('setup_seconds', 0):.1f} | "
                 f"{r.get('train_seconds', 0):.0f} |" for r in rows]
    else:
        head = ("| method | seeds | held-out perplexity | Δ vs uniform | Δ vs PEFT EVA | Σ rank | LoRA params | "
                "max rank | setup s | train s |\n|---|---|---|---|---|---|---|---|---|---|")
        lines = [f"| {_label(r)} | {r['n_seeds']} | {plus_minus(r['perplexity'], digits=3)} | "
                 f"{plus_minus(r['perplexity_vs_uniform'], digits=3, sign=True)} | "
                 f"{plus_minus(r['perplexity_vs_eva'], digits=3, sign=True)} | {r.get('rank_sum', 0):.0f} | "
                 f"{r.get('lora_params', 0):,.0f} | {r.get('rank_max', 0):.0f} | {r.get('setup_seconds', 0):.1f} | "
                 f"{r.get('train_seconds', 0):.0f} |" for r in rows]
    return "\n".join([head, *lines])


def path_in_block(name: str) -> str:
    """A module's path inside its block (after the block index), e.g. ``self_attn.q_proj``."""
    parts = name.split(".")
    last_index = max((i for i, p in enumerate(parts) if p.isdigit()), default=len(parts) - 2)
    return ".".join(parts[last_index + 1:])


def rank_by_type_table(records: list[dict[str, Any]], task: str, avg_rank: int) -> str:
    """Mean rank per module type for each method (over seeds and modules): where the budget went."""
    runs = [r for r in records if r["task"] == task and r["avg_rank"] == avg_rank and "ranks" in r]
    if not runs:
        return ""
    types = list(dict.fromkeys(path_in_block(n) for n in runs[0]["ranks"]))
    by_method: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        for name, rank in r["ranks"].items():
            by_method[r["method"]][path_in_block(name)].append(rank)
    head = "| method | " + " | ".join(types) + " |\n|---" + "|---" * len(types) + "|"
    lines = [f"| {m} | " + " | ".join(f"{statistics.fmean(by_method[m][t]):.2f}" for t in types) + " |"
             for m in sorted(by_method, key=method_order)]
    return "\n".join([head, *lines])


def stability_tables(stab: dict[str, Any]) -> str:
    """Markdown tables of the three stability studies."""
    out = []
    if "domains" in stab:
        tau = stab["domains"]["tau"]
        names = list(tau)
        out.append("**Across calibration domains** (Kendall τ-b between θ orderings)\n")
        out.append("| | " + " | ".join(names) + " |\n|---" * 1 + "|---" * len(names) + "|")
        out += [f"| {a} | " + " | ".join(f"{tau[a][b]:.3f}" for b in names) + " |" for a in names]
    if "sizes" in stab:
        s = stab["sizes"]
        out.append("\n**Across calibration sizes** (τ-b against the full set)\n")
        out.append("| fraction | texts | τ-b vs 100 % | modules with another rank | seconds |\n|---|---|---|---|---|")
        out += [f"| {k} | {s['n_texts'][k]} | {s['tau_vs_full'][k]:.3f} | {s['rank_changes_vs_full'][k]} | "
                f"{s['seconds'][k]:.1f} |" for k in s["tau_vs_full"]]
    if "training" in stab:
        t = stab["training"]
        out.append("\n**Across training** (uniform LoRA; adapter merged after each epoch; τ-b against before training)\n")
        out.append("| epoch | τ-b vs epoch 0 | τ-b vs previous | modules with another rank |\n|---|---|---|---|")
        prev = t["tau_vs_previous"]
        out += [f"| {k} | {t['tau_vs_start'][k]:.3f} | {f'{prev[k]:.3f}' if k in prev else '—'} | "
                f"{t['rank_changes_vs_start'][k]} |" for k in t["tau_vs_start"]]
    return "\n".join(out)


def plot_scores(rows: list[dict[str, Any]], task: str, score: str, path: Path) -> Path | None:
    """Bar chart, one panel per average rank, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["task"] == task]
    ranks = sorted({r["avg_rank"] for r in rows}, reverse=True)
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(ranks), figsize=(6 * len(ranks), 4), squeeze=False)
    for ax, avg_rank in zip(axes[0], ranks):
        sel = [r for r in rows if r["avg_rank"] == avg_rank]
        means = [r[score][0] for r in sel]
        stds = [r[score][1] for r in sel]
        colors = ["tab:gray" if r["method"] == "uniform" else "tab:blue" if r["method"].startswith(("sra", "pra"))
                  else "tab:orange" for r in sel]
        ax.bar(range(len(sel)), means, yerr=stds, color=colors, capsize=3)
        ax.set_xticks(range(len(sel)), [r["method"] for r in sel], rotation=45, ha="right")
        lo, hi = min(m - s for m, s in zip(means, stds)), max(m + s for m, s in zip(means, stds))
        pad = 0.15 * (hi - lo) + 1e-9
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(f"{task}, r̄ = {avg_rank}: {score} (mean ± std, n = {sel[0]['n_seeds']})")
        if any(r["method"] == "uniform" for r in sel):
            ax.axhline(next(r[score][0] for r in sel if r["method"] == "uniform"), color="tab:gray", ls="--", lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_stability(stab: dict[str, Any], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("domains", "sizes", "training") if k in stab]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, name in zip(axes[0], panels):
        if name == "domains":
            tau = stab[name]["tau"]
            names = list(tau)
            low = min(tau[a][b] for a in names for b in names)
            image = ax.imshow([[tau[a][b] for b in names] for a in names], vmin=low - 0.02, vmax=1.0, cmap="viridis")
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
            ax.set_yticks(range(len(names)), names)
            for i, a in enumerate(names):
                for j, b in enumerate(names):
                    ax.text(j, i, f"{tau[a][b]:.3f}", ha="center", va="center", color="k", fontsize=7)
            fig.colorbar(image, ax=ax)
            ax.set_title("τ-b across calibration domains")
        elif name == "sizes":
            s = stab[name]["tau_vs_full"]
            ax.plot([float(k) * 100 for k in s], list(s.values()), marker="o")
            ax.set_xlabel("% of the calibration set")
            ax.set_ylabel("τ-b vs 100 %")
            ax.set_title("τ-b across calibration sizes")
        else:
            t = stab[name]["tau_vs_start"]
            ax.plot([int(k) for k in t], list(t.values()), marker="o", label="vs before training")
            prev = stab[name]["tau_vs_previous"]
            ax.plot([int(k) for k in prev], list(prev.values()), marker="s", label="vs previous epoch")
            ax.set_xlabel("epoch")
            ax.set_ylabel("τ-b")
            ax.legend()
            ax.set_title("τ-b across training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tsqlora_cost_table(records: list[dict[str, Any]], task: str, avg_rank: int) -> str:
    """TsqLoRA's overheads per method: the scoring time against the training time, the refreshes, the τ the
    sampler chose and the effective share of the pool it drew from, the rank units moved."""
    runs = [r for r in records if r["task"] == task and r["avg_rank"] == avg_rank and "scoring_seconds" in r]
    if not runs:
        return ""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_method[r["method"]].append(r)
    lines = ["| method | seeds | scoring s | scoring / training time | refreshes | τ (median) | n_eff / pool (mean) | "
             "rank units moved |", "|---|---|---|---|---|---|---|---|"]
    for method in sorted(by_method, key=method_order):
        mine = by_method[method]
        log = [x for r in mine for x in r.get("refresh_log", [])]
        taus = [x["temperature"] for x in log if "temperature" in x]
        shares = [x["effective_fraction"] for x in log if "effective_fraction" in x]
        moved = [sum(abs(new - old) for change in r.get("rank_changes", []) for old, new in change["changes"].values())
                 / 2 for r in mine]
        lines.append(f"| {method} | {len(mine)} | {plus_minus(mean_std(r['scoring_seconds'] for r in mine), digits=1)} | "
                     f"{plus_minus(mean_std(r.get('scoring_fraction', 0.0) for r in mine))} | "
                     f"{statistics.fmean(r['refreshes'] for r in mine):.0f} | "
                     f"{f'{statistics.median(taus):.2f}' if taus else '—'} | "
                     f"{f'{statistics.fmean(shares):.2f}' if shares else '—'} | {plus_minus(mean_std(moved), digits=1)} |")
    return "\n".join(lines)


def _convergence(records: list[dict[str, Any]], files, plots: list[str]) -> list[str]:
    """The convergence tables and curve plots, where runs recorded held-out curves (``--eval-every``)."""
    from .convergence import convergence_rows, convergence_table, plot_curves

    if not any(r.get("eval_curve") for r in records):
        return []
    rows = convergence_rows(records)
    parts: list[str] = []
    for task, avg_rank in sorted({(r["task"], r["avg_rank"]) for r in rows}, key=lambda k: (k[0], -k[1])):
        plots += _plot_into(files, f"{task}_r{avg_rank}_curves.png",
                            lambda p: plot_curves(records, task, avg_rank, p))
        parts.append(f"### Convergence: {task}, average rank {avg_rank}\n\n{convergence_table(rows, task, avg_rank)}\n")
    return parts


def _tuned(records: list[dict[str, Any]], tasks: set[str], rate_records: list[dict[str, Any]] | None = None,
           rates_from: Path | None = None) -> list[str]:
    """The learning-rate grid (validation split) and the test comparison at each method's tuned rate: tuned on
    this folder's grid, or on ``rate_records``' (another setting's, read from ``rates_from``) when given."""
    from .quality import lr_grid_table, tuned_lrs, tuned_table

    parts = []
    for task in sorted(tasks):
        for avg_rank in sorted({r["avg_rank"] for r in records if r["task"] == task and r["avg_rank"] > 0},
                               reverse=True):
            grid = lr_grid_table(records, task, avg_rank)
            if grid:
                parts.append(f"### {task}, average rank {avg_rank}: learning-rate grid (validation split)\n\n{grid}\n")
            lrs = tuned_lrs(rate_records, task, avg_rank) if rate_records is not None else None
            table = tuned_table(records, task, avg_rank, lrs)
            if table:
                where = f", rates tuned on the validation split of {rates_from}" if rates_from is not None else ""
                parts.append(f"### {task}, average rank {avg_rank}: each method at its tuned rate (test split{where})"
                             f"\n\n{table}\n")
    return parts


def write_report(results: Path, out: Path, rates_from: Path | None = None) -> list[Path]:
    """tables.md (+ summary.json) and PNG plots in ``out`` from the results JSON files in ``results``;
    ``rates_from``: a results folder whose validation grid chooses each method's rate (e.g. SmolLM2's, reused
    for another model; a method it did not tune keeps its only tested rate).

    The set is written whole or not at all: it replaces the previous report's files (plots that are not
    made again are removed), and a folder with no run records is refused before anything is written."""
    from ..folders import FileSet, output_lock

    records = load_records(results)
    rate_records = None
    if rates_from is not None:
        rate_records = [r for r in load_records(rates_from) if r.get("split") == "validation"]
        if not rate_records:
            raise ValueError(f"{rates_from} holds no validation-split runs to choose learning rates from; "
                             "give the folder of an `evaluate ... --split validation` grid")
    stab_path = results / "stability.json"
    stab = read_json(stab_path) if stab_path.exists() else None
    if not records and stab is None:
        raise ValueError(f"{results} holds no run records (JSON lists written by `sensitivity-lora evaluate` runs) "
                         "and no stability.json: nothing to report; check the --results folder")
    with output_lock(out, "report folder") as folder:
        old = ["tables.md", "summary.json", "stability.png", *(p.name for task in SCORES
                                                              for p in folder.glob(f"{task}_*.png"))]
        with FileSet(folder, replaces=old) as files:
            names = _write_report_files(records, stab, files, rate_records, rates_from)
            files.commit()
    return [out / name for name in names]


def _plot_into(files, name: str, plot) -> list[str]:
    """Run ``plot(staged_path)``; the file joins the set only when a plot was made."""
    if plot(files.path(name)):
        return [name]
    files.forget(name)
    return []


def _write_report_files(records: list[dict[str, Any]], stab: dict[str, Any] | None, files,
                        rate_records: list[dict[str, Any]] | None = None, rates_from: Path | None = None) -> list[str]:
    parts, plots = [], []
    tuned = {r["task"] for r in records if r.get("split") == "validation"}
    if rate_records is not None:
        tuned |= {r["task"] for r in records if r.get("lr") is not None}
    if tuned:  # a learning-rate study: the grid and the comparison at each method's tuned rate
        parts += _tuned(records, tuned, rate_records, rates_from)
        records = [r for r in records if r["task"] not in tuned]
    rows = summarize(records)
    for task in SCORES:
        for avg_rank in sorted({r["avg_rank"] for r in rows if r["task"] == task}, reverse=True):
            if task == "causal_lm" and avg_rank == 0:
                continue
            parts.append(f"### {task}, average rank {avg_rank}\n\n{results_table(rows, task, avg_rank)}\n")
            cost = tsqlora_cost_table(records, task, avg_rank)
            if cost:
                parts.append(f"TsqLoRA's overheads ({task}, r̄ = {avg_rank}):\n\n{cost}\n")
            types = rank_by_type_table(records, task, avg_rank)
            if types:
                parts.append(f"Mean rank per module type ({task}, r̄ = {avg_rank}):\n\n{types}\n")
        for score in SCORES[task]:
            scored = [r for r in rows if r["avg_rank"] > 0]
            plots += _plot_into(files, f"{task}_{score}.png", lambda p: plot_scores(scored, task, score, p))
    parts += _convergence(records, files, plots)
    base = [r for r in rows if r["task"] == "causal_lm" and r["method"] == "base"]
    if base:
        parts.append(f"Untrained model's held-out perplexity: {base[0]['perplexity'][0]:.3f}\n")
    if stab is not None:
        parts.append("### Stability (SmolLM2-135M)\n\n" + stability_tables(stab) + "\n")
        plots += _plot_into(files, "stability.png", lambda p: plot_stability(stab, p))
    files.write_text("tables.md", "\n".join(parts))
    files.write_text("summary.json", json.dumps(rows, indent=1))
    return ["tables.md", "summary.json", *plots]
