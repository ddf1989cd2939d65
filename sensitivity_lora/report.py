"""Tables and plots of an allocation: ranks laid out as layers × module types.

Works for any module naming: the layer is the first integer path component (``model.layers.12.mlp.up_proj``
→ 12, in the container ``model.layers``), the type its last component(s); types that would collide inside
one layer (BERT's ``attention.output.dense`` and ``output.dense``) keep as many components as they need.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# Last components that say little on their own ("dense"): the type keeps the component before them too.
_GENERIC = {"dense", "linear", "lin", "proj", "fc", "out", "layer", "weight"}
OTHER = "other"

RowKey = tuple[str, int | None]  # (container path, layer index); ("", None) for modules outside any layer list


def _split(name: str) -> tuple[str, int | None, list[str]]:
    """(container, layer index, the components after the index) of a module name."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i]), int(part), parts[i + 1:]
    return "", None, parts


def module_type(name: str) -> str:
    """The last path component ("q_proj"); with the one before it when that alone is generic ("output.dense")."""
    _, index, rest = _split(name)
    parts = rest if index is not None and rest else name.split(".")  # never borrow the layer index itself
    last = parts[-1]
    if len(parts) > 1 and (last in _GENERIC or last.isdigit()):
        return ".".join(parts[-2:])
    return last


def layer_index(name: str) -> int | None:
    """The first integer path component ("model.layers.12.mlp.up_proj" → 12), None when there is none."""
    return _split(name)[1]


def _column_labels(names: list[str]) -> dict[str, str]:
    """module_type of each name, lengthened where two modules of one layer would share a label."""
    rest = {n: _split(n)[2] or [n] for n in names}
    labels = {n: module_type(n) for n in names}
    for _ in range(max((len(r) for r in rest.values()), default=0) + 1):
        seen: dict[tuple[RowKey, str], int] = {}
        for n in names:
            key = (_row_key(n), labels[n])
            seen[key] = seen.get(key, 0) + 1
        clashing = {label for (_, label), count in seen.items() if count > 1}
        if not clashing:
            break
        for n in names:
            if labels[n] in clashing:  # one more component (at most the whole path after the layer index)
                labels[n] = ".".join(rest[n][-(labels[n].count(".") + 2):])
    return labels


def _row_key(name: str) -> RowKey:
    container, index, _ = _split(name)
    return (container, index) if index is not None else ("", None)


def _layout(allocation: Any) -> tuple[list[RowKey], list[str], dict[tuple[RowKey, str], list[str]]]:
    """Rows (layers in model order, 'other' last), columns (types in order of appearance), cells → names."""
    names = list(allocation.modules)
    if not names:
        raise ValueError("the allocation has no modules: there is nothing to report")
    labels = _column_labels(names)
    containers: list[str] = []
    columns: list[str] = []
    cells: dict[tuple[RowKey, str], list[str]] = {}
    for n in names:
        key = _row_key(n)
        if key[1] is not None and key[0] not in containers:
            containers.append(key[0])
        if labels[n] not in columns:
            columns.append(labels[n])
        cells.setdefault((key, labels[n]), []).append(n)
    keys = {k for k, _ in cells}
    rows = sorted((k for k in keys if k[1] is not None), key=lambda k: (containers.index(k[0]), k[1]))
    if ("", None) in keys:
        rows.append(("", None))
    return rows, columns, cells


def _row_labels(rows: list[RowKey]) -> list[str]:
    several = len({c for c, i in rows if i is not None}) > 1
    return [OTHER if i is None else (f"{c}.{i}" if several else str(i)) for c, i in rows]


def _share(value: float) -> float:
    """Allocation.concentration()'s share (a fraction) as a percentage."""
    return 100.0 * value


def _bound_text(settings: dict) -> tuple[str, str]:
    """' = 1' and ' = 32' / ' (ρ = 4)' style suffixes for r_min and r_max, from what the settings record."""
    r_min = f" = {settings['r_min']}" if settings.get("r_min") is not None else ""
    if settings.get("r_max") is not None:
        r_max = f" = {settings['r_max']}"
    elif settings.get("rho") is not None:
        rho = float(settings["rho"])
        r_max = " (matrix size, no ρ cap)" if math.isinf(rho) else f" (ρ = {rho:g})"
    else:
        r_max = ""
    return r_min, r_max


def _summary_lines(allocation: Any) -> list[str]:
    mods = allocation.modules
    total = sum(m.rank for m in mods.values())
    mode = getattr(allocation, "budget_mode", "rank")
    unit = "ranks" if mode == "rank" else "parameters"
    lines = [f"{len(mods)} modules, method {allocation.method}, r̄ = {allocation.avg_rank:g}, Σ rank = {total}, "
             f"budget = {allocation.budget} {unit}"]
    if mode != "rank":
        params = sum(m.rank * (m.d_in + m.d_out) for m in mods.values())
        lines.append(f"LoRA parameters Σ r·(d_in + d_out) = {params:,} of the budget {allocation.budget:,}")
    conc = allocation.concentration()
    r_min, r_max = _bound_text(getattr(allocation, "settings", None) or {})
    top = f" ({conc['top_modules']})" if "top_modules" in conc else ""
    lines.append(f"concentration: the top 5% of modules{top} hold {_share(conc['top5_share']):.1f}% of the ranks; "
                 f"modules at r_min{r_min}: {conc['at_min']}, at r_max{r_max}: {conc['at_max']}")
    return lines


def rank_table(allocation: Any) -> str:
    """A plain-text table: a row per layer, a column per module type, ranks in the cells; then per-type mean
    and Σ rank, the budget, and how concentrated the allocation is."""
    rows, columns, cells = _layout(allocation)
    mods = allocation.modules
    grid = [[("/".join(str(mods[n].rank) for n in cells[(row, col)]) if (row, col) in cells else "·")
             for col in columns] for row in rows]
    per_type = {col: [mods[n].rank for (_, c), names in cells.items() if c == col for n in names] for col in columns}
    means = [f"{sum(v) / len(v):.1f}" for v in per_type.values()]
    sums = [str(sum(v)) for v in per_type.values()]
    heads = ["layer", *_row_labels(rows), "mean", "Σ rank"]
    body = [columns, *grid, means, sums]
    first = max(map(len, heads))
    widths = [max(len(line[j]) for line in body) for j in range(len(columns))]

    def fmt(head: str, cols: list[str]) -> str:
        return "  ".join([head.ljust(first), *(c.rjust(w) for c, w in zip(cols, widths))]).rstrip()

    out = [fmt(heads[0], columns)]
    out += [fmt(h, line) for h, line in zip(heads[1:-2], grid)]
    out.append("-" * len(out[0]))
    out += [fmt(heads[-2], means), fmt(heads[-1], sums), ""]
    return "\n".join(out + _summary_lines(allocation))


def plot_ranks(allocation: Any, path: str | Path) -> None:
    """A heatmap of the ranks (module types × layers) saved to ``path`` (PNG unless the suffix says otherwise)."""
    try:
        import matplotlib
    except ImportError as exc:
        from .errors import MissingPackageError

        raise MissingPackageError("matplotlib", "pip install 'sensitivity-lora[plot]'", "the rank heatmap") from exc
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, columns, cells = _layout(allocation)
    mods = allocation.modules
    values = np.full((len(columns), len(rows)), np.nan)  # layers run left to right: wide, like the model
    for (row, col), names in cells.items():
        values[columns.index(col), rows.index(row)] = sum(mods[n].rank for n in names)
    data = np.ma.masked_invalid(values)
    x_labels = _row_labels(rows)

    fig = Figure(figsize=(min(max(6.0, 0.42 * len(rows) + 3.0), 60.0), max(3.0, 0.45 * len(columns) + 2.0)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")  # grey: a type that layer lacks
    image = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest")
    crowded = max(map(len, x_labels)) * len(x_labels) > 60
    ax.set_xticks(range(len(rows)), x_labels, rotation=90 if crowded else 0, fontsize=8)
    ax.set_yticks(range(len(columns)), columns, fontsize=9)
    ax.set_xlabel("layer")
    ax.set_ylabel("module type")
    if values.size <= 600:
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        for (yi, xi), value in np.ndenumerate(values):
            if math.isnan(value):
                continue
            level = (value - low) / (high - low) if high > low else 0.5
            ax.text(xi, yi, f"{value:g}", ha="center", va="center", fontsize=7,
                    color="black" if level > 0.6 else "white")
    fig.colorbar(image, ax=ax, label="LoRA rank", fraction=0.04, pad=0.01)
    conc = allocation.concentration()
    ax.set_title(f"Sensitivity-LoRA ranks — {allocation.method}, r̄ = {allocation.avg_rank:g}\n"
                 f"budget {allocation.budget} ({getattr(allocation, 'budget_mode', 'rank')}), "
                 f"top 5% of modules hold {_share(conc['top5_share']):.1f}%", fontsize=10)
    from .files import atomic_write

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = out.suffix[1:].lower() or "png"
    # written atomically; no "Software"/date metadata, so the same allocation gives the same bytes
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=120, format=fmt,
                                              metadata={"Software": None} if fmt == "png" else None))
