"""Progress of long work, when asked for: a tqdm bar on a terminal, plain log lines anywhere else.

A bar redraws itself with carriage returns, which turns a log file, a pipe or a CI log into one
long line; there the same progress goes to the ``sensitivity_lora.progress`` logger at INFO
instead: a line at the start, about every 10 % (every ``UNSIZED_EVERY`` items when the total
is unknown) and at the end.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Iterable, Iterator

logger = logging.getLogger(__name__)

UNSIZED_EVERY = 10  # items between two log lines when the iterable has no length


def progress_bar(items: Iterable, enabled: bool, desc: str = "calibrating", unit: str = "batch") -> Iterable:
    """``items`` with progress shown when ``enabled`` (any iterable, sized or not)."""
    if not enabled:
        return items
    try:
        total: int | None = len(items)  # type: ignore[arg-type]
    except TypeError:  # generators, DataLoaders over iterable datasets
        total = None
    if not draws_bars():
        return _logged(items, total, desc, unit)
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit=unit)


def draws_bars() -> bool:
    """A terminal on stderr, or a Jupyter kernel (its stderr is no terminal, but tqdm.auto draws a widget)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


def _logged(items: Iterable, total: int | None, desc: str, unit: str) -> Iterator:
    every = max(1, math.ceil(total / 10)) if total else UNSIZED_EVERY
    of = f"/{total}" if total is not None else ""
    start = time.perf_counter()
    logger.info("%s: %s 0%s", desc, unit, of)
    done = 0
    for item in items:
        yield item
        done += 1
        if done % every == 0 and done != total:
            share = f"{100 * done // total}%, " if total else ""
            logger.info("%s: %s %d%s (%s%.1f s)", desc, unit, done, of, share, time.perf_counter() - start)
    logger.info("%s: %s %d%s done in %.1f s", desc, unit, done, of, time.perf_counter() - start)
