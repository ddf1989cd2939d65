"""Resumable streaming: finalised per-block statistics on disk, and which blocks are done.

A checkpoint folder holds ``manifest.json`` (the run's fingerprint, see
``fingerprint``: model weights and config, data, settings, package version; and the
list of finished blocks) and, when ``store`` is on, ``block_00012.safetensors`` with
that block's raw sums (the encoding of ``serialize``). Every file is written to a
temporary name and renamed, and a block is listed as done only after its file exists,
so a run killed at any point resumes from the last finished block and gives the same
result. Resuming with anything that differs is refused with an error naming it; every
file read back is checked (shapes, dtypes, finite values) and a bad one is named. One
run at a time: the folder is locked while a run writes to it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch

from ..errors import CheckpointMismatchError, FileFormatError
from ..files import atomic_save_safetensors, atomic_write_json, remove_stale_temporaries
from ..folders import output_lock
from .fingerprint import differences
from .serialize import check_group, group_from, group_header, group_tensors, read_safetensors
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
        self._lock = None

    def open(self, fingerprint: Mapping) -> list[int]:
        """Start or resume; returns the indices of the blocks already finished. A writable checkpoint holds
        the folder's lock until :meth:`close` (a second run on the folder gets OutputInUseError)."""
        fingerprint = json.loads(json.dumps(dict(fingerprint)))  # normalise (tuples → lists)
        if self.writable and self._lock is None:
            self._lock = output_lock(self.directory, "checkpoint folder")
            self._lock.__enter__()
        try:
            return self._open(fingerprint)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the folder's lock (idempotent)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.__exit__(None, None, None)

    def _read_manifest(self, path: Path) -> dict:
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise FileFormatError(f"{path} is not a readable checkpoint manifest ({exc}); delete the folder "
                                  f"{self.directory} to start over") from None
        done = manifest.get("done") if isinstance(manifest, dict) else None
        if (not isinstance(manifest, dict) or not isinstance(manifest.get("fingerprint"), dict)
                or not isinstance(done, list)
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in done)):
            raise FileFormatError(f"{path} is not a checkpoint manifest of this package (it needs a fingerprint "
                                  f"and a list of finished block numbers); delete the folder {self.directory} "
                                  "to start over")
        return manifest

    def _open(self, fingerprint: dict) -> list[int]:
        path = self.directory / MANIFEST
        if path.exists():
            manifest = self._read_manifest(path)
            diff = differences(manifest["fingerprint"], fingerprint)
            if diff:
                raise CheckpointMismatchError(
                    f"checkpoint {self.directory} was written by a different run: {'; '.join(diff)} differ. "
                    "Resume with the same model, data and settings, or use a new (or emptied) checkpoint folder"
                )
            if manifest.get("store", True) != self.store:
                raise CheckpointMismatchError(f"checkpoint {self.directory} was written with store={manifest.get('store')}")
            self.done = sorted(set(manifest["done"]))
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
            # a run killed between a temporary file and its rename left it here; this run holds the lock
            remove_stale_temporaries(self.directory, ("block_", MANIFEST))
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
        """The statistics saved for block ``index``, every tensor checked (FileFormatError naming the file)."""
        if not self.store:
            raise ValueError(f"checkpoint {self.directory} does not store statistics (store=False)")
        path = self._block_path(index)
        meta, tensors = read_safetensors(path, "checkpoint block")
        fix = f"delete the checkpoint folder {self.directory} to start over"
        try:
            headers = json.loads(meta["groups"])
            dims = {k: (int(v[0]), int(v[1])) for k, v in json.loads(meta["dims"]).items()}
            module_group = json.loads(meta["module_group"])
            mode = meta["mode"]
            if not isinstance(headers, list) or not isinstance(module_group, dict):
                raise TypeError("groups must be a list and module_group a mapping")
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise FileFormatError(f"{path}: its metadata is not that of a checkpoint block ({exc}); {fix}") from None
        groups = {}
        for j, header in enumerate(headers):
            check_group(header, tensors, f"g{j}.", path, fix)
            groups[header["group"]] = group_from(header, tensors, prefix=f"g{j}.", device=device, backend=backend)
        return CalibrationStatistics(groups, module_group, dims, mode)
