"""Progress bars for long work (tqdm, only when asked for)."""
from __future__ import annotations

from typing import Iterable


def progress_bar(items: Iterable, enabled: bool, desc: str = "calibrating", unit: str = "batch") -> Iterable:
    """``items`` wrapped in a tqdm bar when ``enabled`` (any iterable, sized or not)."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    try:
        total = len(items)  # type: ignore[arg-type]
    except TypeError:  # generators, DataLoaders over iterable datasets
        total = None
    return tqdm(items, total=total, desc=desc, unit=unit)
