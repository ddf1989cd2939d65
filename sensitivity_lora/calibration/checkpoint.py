"""Resumable streaming: finalised per-block statistics on disk, and which blocks are done.

A checkpoint folder holds ``manifest.json`` (a fingerprint of the run: targets,
Hessian mode, the calibration data's hash, ... and the list of finished
blocks) and, when ``store`` is on, ``block_00012.safetensors`` with that block's
raw sums (the encoding of ``serialize``). Every file is written to a temporary
name and renamed, and a block is listed as done only after its file exists, so
a run killed at any point resumes from the last finished block and gives the
same result. Resuming with other data or settings is refused with an error.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch

from ..errors import CheckpointMismatchError
from ..files import atomic_save_safetensors, atomic_write_json
from .serialize import group_from, group_header, group_tensors
from .statistics import CalibrationStatistics

MANIFEST = "manifest.json"


class BlockCheckpoint:
    """Per-block checkpoint in ``directory``.

    ``store=False`` records only which blocks are done (for exports, whose
    output files already hold the data); ``writable=False`` reads but never
    writes (the non-zero ranks of a distributed run).
    """

    def __init__(self, directory: str | os.PathLike, store: bool = True, writable: bool = True) -> None:
        self.directory = Path(directory)
        self.store = store
        self.writable = writable
        self.done: list[int] = []
        self._manifest: dict | None = None

    def open(self, fingerprint: Mapping) -> list[int]:
        """Start or resume; returns the indices of the blocks already finished."""
        fingerprint = json.loads(json.dumps(dict(fingerprint)))  # normalise (tuples → lists)
        path = self.directory / MANIFEST
        if path.is_file():
            manifest = json.loads(path.read_text())
            old = manifest.get("fingerprint", {})
            diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            if diff:
                raise CheckpointMismatchError(
                    f"checkpoint {self.directory} was written by a different run ({', '.join(diff)} differ); "
                    "resume with the same model, data and settings, or use a new checkpoint folder"
                )
            if manifest.get("store", True) != self.store:
                raise CheckpointMismatchError(f"checkpoint {self.directory} was written with store={manifest.get('store')}")
            self.done = [int(i) for i in manifest.get("done", [])]
            if self.store:
                missing = [i for i in self.done if not self._block_path(i).is_file()]
                if missing:
                    raise CheckpointMismatchError(
                        f"checkpoint {self.directory} lists block {missing[0]} as done but its file is missing; "
                        "delete the folder to start over"
                    )
        else:
            self.done = []
        self._manifest = {"fingerprint": fingerprint, "store": self.store, "done": list(self.done)}
        if self.writable:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, self._manifest)
        return list(self.done)

    def _block_path(self, index: int) -> Path:
        return self.directory / f"block_{index:05d}.safetensors"

    def save(self, index: int, stats: CalibrationStatistics) -> None:
        """Record block ``index`` as finished (with its statistics when ``store``)."""
        if self._manifest is None:
            raise RuntimeError("BlockCheckpoint.open() must be called before save()")
        if index in self.done:
            return
        if self.writable:
            if self.store:
                tensors, headers = {}, []
                for j, group in enumerate(stats.groups.values()):
                    tensors.update(group_tensors(group, prefix=f"g{j}."))
                    headers.append(group_header(group, stats.dims))
                meta = {"groups": json.dumps(headers), "dims": json.dumps({k: list(v) for k, v in stats.dims.items()}),
                        "module_group": json.dumps(stats.module_group), "mode": stats.mode}
                atomic_save_safetensors(self._block_path(index), tensors, meta)
            self._manifest["done"].append(index)
            atomic_write_json(self.directory / MANIFEST, self._manifest)
        self.done.append(index)

    def load(self, index: int, device: torch.device | str = "cpu", backend: str | None = None) -> CalibrationStatistics:
        """The statistics saved for block ``index``."""
        from safetensors import safe_open

        if not self.store:
            raise ValueError(f"checkpoint {self.directory} does not store statistics (store=False)")
        with safe_open(str(self._block_path(index)), framework="pt", device="cpu") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        groups = {}
        for j, header in enumerate(json.loads(meta["groups"])):
            groups[header["group"]] = group_from(header, tensors, prefix=f"g{j}.", device=device, backend=backend)
        dims = {k: (int(v[0]), int(v[1])) for k, v in json.loads(meta["dims"]).items()}
        return CalibrationStatistics(groups, json.loads(meta["module_group"]), dims, meta["mode"])
