"""Results files: a JSON list of run records, rewritten atomically after every run.

A long study that crashes loses at most the run in progress; started again, it
skips the runs already in the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import FileFormatError
from ..files import atomic_write_json, json_safe, read_json
from ..folders import file_lock

KEY_FIELDS = ("task", "method", "avg_rank", "seed", "lr", "split", "n_val")
# Records written before the learning-rate grid and the validation split carry none of the last three.
KEY_DEFAULTS = {"lr": None, "split": "test", "n_val": 0}


def run_key(record: dict[str, Any]) -> tuple:
    return tuple(record.get(k, KEY_DEFAULTS.get(k)) for k in KEY_FIELDS)


class ResultStore:
    """The records of one results file, keyed by (task, method, avg_rank, seed, lr, split)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = self._read()

    def _read(self) -> list[dict[str, Any]]:
        records = read_json(self.path) if self.path.exists() else []
        if not isinstance(records, list):
            raise FileFormatError(f"{self.path} is not a results file (expected a JSON list of records)")
        return records

    def has(self, task: str, method: str, avg_rank: int, seed: int, lr: float | None = None,
            split: str = "test", n_val: int = 0) -> bool:
        return (task, method, avg_rank, seed, lr, split, n_val) in {run_key(r) for r in self.records}

    def check_resumable(self) -> None:
        """Refuse to add runs to a file written before runs recorded their learning rate: its runs could not be
        told apart from the new ones (and would be run again)."""
        legacy = [r for r in self.records if "lr" not in r and r.get("method") != "base"]
        if legacy:
            raise FileFormatError(f"{self.path} holds {len(legacy)} runs written before runs recorded their "
                                  "learning rate; write new runs to another --out (the report reads both)")

    def add(self, record: dict[str, Any]) -> None:
        """Append ``record`` (replacing a run with its key) to what the file holds NOW: another process
        appending to the same file meanwhile (two evaluation lanes) loses nothing."""
        key = run_key(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path):
            self.records = [r for r in self._read() if run_key(r) != key] + [json_safe(record)]
            atomic_write_json(self.path, self.records)
