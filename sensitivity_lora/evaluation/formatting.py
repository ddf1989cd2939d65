"""Numbers for the results tables: mean ± std over seeds, their text, and the methods' order."""
from __future__ import annotations

import math
import statistics
from typing import Iterable

from .methods import METHODS


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def plus_minus(pair: tuple[float, float] | None, scale: float = 1.0, digits: int = 2, sign: bool = False) -> str:
    """"m ± s" (with a sign: "+m ± s"); "—" for no value."""
    if pair is None:
        return "—"
    m, s = pair[0] * scale, pair[1] * scale
    return f"{m:+.{digits}f} ± {s:.{digits}f}" if sign else f"{m:.{digits}f} ± {s:.{digits}f}"


def method_order(method: str) -> int:
    """A method's place in the METHODS table (unknown names first)."""
    names = list(METHODS)
    return names.index(method) if method in names else -1
