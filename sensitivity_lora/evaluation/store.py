"""Results files: a JSON list of run records, rewritten atomically after every run.

A long study that crashes loses at most the run in progress; started again, it
skips the runs already in the file.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

KEY_FIELDS = ("task", "method", "avg_rank", "seed")


def run_key(record: dict[str, Any]) -> tuple:
    return tuple(record.get(k) for k in KEY_FIELDS)


def _clean(value: Any) -> Any:
    """JSON has no inf/nan: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class ResultStore:
    """The records of one results file, keyed by (task, method, avg_rank, seed)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = json.loads(self.path.read_text()) if self.path.exists() else []
        if not isinstance(self.records, list):
            raise ValueError(f"{self.path} is not a results file (expected a JSON list of records)")

    def has(self, task: str, method: str, avg_rank: int, seed: int) -> bool:
        return (task, method, avg_rank, seed) in {run_key(r) for r in self.records}

    def add(self, record: dict[str, Any]) -> None:
        key = run_key(record)
        self.records = [r for r in self.records if run_key(r) != key] + [_clean(record)]
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(self.records, f, indent=1)
        os.replace(tmp, self.path)
