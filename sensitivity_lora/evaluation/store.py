"""Results files: a JSON list of run records, rewritten atomically after every run.

A long study that crashes loses at most the run in progress; started again, it
skips the runs already in the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import FileFormatError
from ..files import atomic_write_json, json_safe

KEY_FIELDS = ("task", "method", "avg_rank", "seed", "lr", "split")
# Records written before the learning-rate grid and the validation split carry neither field.
KEY_DEFAULTS = {"lr": None, "split": "test"}


def run_key(record: dict[str, Any]) -> tuple:
    return tuple(record.get(k, KEY_DEFAULTS.get(k)) for k in KEY_FIELDS)


class ResultStore:
    """The records of one results file, keyed by (task, method, avg_rank, seed, lr, split)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        if self.path.exists():
            try:
                self.records = json.loads(self.path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise FileFormatError(f"{self.path} is not valid JSON ({exc}); fix it or choose another --out "
                                      "(it is never overwritten while it cannot be read)") from None
        if not isinstance(self.records, list):
            raise FileFormatError(f"{self.path} is not a results file (expected a JSON list of records)")

    def has(self, task: str, method: str, avg_rank: int, seed: int, lr: float | None = None,
            split: str = "test") -> bool:
        return (task, method, avg_rank, seed, lr, split) in {run_key(r) for r in self.records}

    def add(self, record: dict[str, Any]) -> None:
        key = run_key(record)
        self.records = [r for r in self.records if run_key(r) != key] + [json_safe(record)]
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.records)
