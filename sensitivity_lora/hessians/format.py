"""Hessians on disk: one safetensors file per input group, readable by other tools.

Each file holds the raw fp64 sums of one input group (``xtx`` = Σ x xᵀ, full and
symmetric, when calibrated with ``hessian="full"``; ``sumsq`` = Σ x² and ``sum`` = Σ x, always)
and, in its string metadata, the token and sequence counts, the member module
names with their (d_in, d_out), and the project's normalisation convention. The
loader applies any convention of ``calibration.statistics.NORMALISATIONS`` on the way out.
Nothing is pickled: safetensors for tensors, JSON for everything else.

    from sensitivity_lora import export_hessians, load_hessians
    export_hessians(model, batches, "hessians/")                 # streams block by block
    H = load_hessians("hessians/", convention="2/sequences")     # GPTQ's convention
    H["model.layers.0.self_attn.q_proj"].hessian                 # (d_in, d_in) fp64
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from ..calibration.serialize import group_from, group_header, group_tensors
from ..calibration.statistics import GroupStatistics, normalisation_factor
from ..files import atomic_save_safetensors, atomic_write_json

FORMAT = "sensitivity-lora-hessian"
FORMAT_VERSION = "2"  # 2: adds ``sum`` (Σx)
PROJECT_CONVENTION = "2/tokens"
INDEX_FILE = "index.json"


# ---------------------------------------------------------------- writing

def group_filename(group: str) -> str:
    """A portable file name for an input group (its leader module's name)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", group) + ".safetensors"


def save_group(path: str | os.PathLike, group: GroupStatistics, dims: Mapping[str, tuple[int, int]]) -> Path:
    """Write one input group's Hessian file (see the module docstring for the layout)."""
    path = Path(path)
    header = group_header(group, dims)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "stored": "raw_sum",  # H = factor(convention) · xtx
        "normalisation": PROJECT_CONVENTION,
        "conventions": json.dumps(["2/tokens", "2/sequences", "1/tokens", "sum"]),
        "group": header["group"],
        "members": json.dumps(header["members"]),
        "member_dims": json.dumps(header["member_dims"]),
        "d_in": str(header["d_in"]),
        "mode": header["mode"],
        "n_tokens": str(header["n_tokens"]),
        "n_sequences": str(header["n_sequences"]),
    }
    atomic_save_safetensors(path, group_tensors(group), metadata)
    return path


class HessianWriter:
    """Writes groups into ``out_dir`` one at a time and keeps ``index.json`` (module → file) current."""

    def __init__(self, out_dir: str | os.PathLike, settings: Mapping | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        index_path = self.out_dir / INDEX_FILE
        self.index = json.loads(index_path.read_text()) if index_path.exists() else {}
        self.index.update(format=FORMAT, format_version=FORMAT_VERSION, normalisation=PROJECT_CONVENTION)
        self.index.setdefault("groups", {})
        self.index.setdefault("modules", {})
        if settings:
            self.index["settings"] = dict(settings)

    def write(self, groups: Iterable[GroupStatistics], dims: Mapping[str, tuple[int, int]]) -> None:
        for group in groups:
            name = group_filename(group.name)
            save_group(self.out_dir / name, group, dims)
            self.index["groups"][group.name] = name
            for member in group.members:
                self.index["modules"][member] = group.name
        atomic_write_json(self.out_dir / INDEX_FILE, self.index)


# ---------------------------------------------------------------- reading

@dataclass
class HessianFile:
    """One input group's Hessian as read back; ``hessian``/``diag`` are normalised by ``convention``."""

    group: str
    members: list[str]
    member_dims: dict[str, tuple[int, int]]
    n_tokens: int
    n_sequences: int
    convention: str
    raw_sumsq: torch.Tensor
    raw_xtx: torch.Tensor | None
    raw_sum: torch.Tensor

    @property
    def factor(self) -> float:
        return normalisation_factor(self.convention, self.n_tokens, self.n_sequences)

    @property
    def diag(self) -> torch.Tensor:
        """diag(H_row) (fp64)."""
        return self.raw_sumsq * self.factor

    @property
    def hessian(self) -> torch.Tensor:
        """The full H_row (fp64); needs files written from ``hessian="full"`` calibration."""
        if self.raw_xtx is None:
            raise ValueError(f"{self.group}: this file holds only the diagonal; export with hessian='full'")
        return self.raw_xtx * self.factor

    def statistics(self, device: torch.device | str = "cpu") -> GroupStatistics:
        """Back to a ``GroupStatistics`` (e.g. to score it or to merge files of several runs)."""
        header = {"group": self.group, "members": self.members, "d_in": self.raw_sumsq.numel(),
                  "mode": "full" if self.raw_xtx is not None else "diag",
                  "n_tokens": self.n_tokens, "n_sequences": self.n_sequences}
        tensors = {"sumsq": self.raw_sumsq, "sum": self.raw_sum,
                   **({"xtx": self.raw_xtx} if self.raw_xtx is not None else {})}
        return group_from(header, tensors, device=device)


def load_hessian(path: str | os.PathLike, convention: str = PROJECT_CONVENTION,
                 device: torch.device | str = "cpu") -> HessianFile:
    """Read one file written by :func:`save_group`."""
    from safetensors import safe_open

    normalisation_factor(convention, 1, 1)  # fail early on an unknown convention
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Hessian file at {path}")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a sensitivity-lora Hessian file (format={meta.get('format')!r})")
        if meta.get("stored") != "raw_sum":
            raise ValueError(f"{path} stores {meta.get('stored')!r}; this reader understands only 'raw_sum'")
        keys = set(f.keys())
        sumsq = f.get_tensor("sumsq")
        if "sum" not in keys:
            raise ValueError(f"{path} has no 'sum' tensor (format version {meta.get('format_version')}); "
                             "export it again with this version of sensitivity-lora")
        total = f.get_tensor("sum")
        xtx = f.get_tensor("xtx") if "xtx" in keys else None
    dims = {k: (int(v[0]), int(v[1])) for k, v in json.loads(meta.get("member_dims", "{}")).items()}
    return HessianFile(meta["group"], json.loads(meta["members"]), dims, int(meta["n_tokens"]),
                       int(meta["n_sequences"]), convention, sumsq, xtx, total)


def load_hessians(out_dir: str | os.PathLike, convention: str = PROJECT_CONVENTION,
                  device: torch.device | str = "cpu", by: str = "module") -> dict[str, HessianFile]:
    """All Hessians of an export folder, keyed by module name (``by="module"``) or group (``by="group"``)."""
    if by not in ("module", "group"):
        raise ValueError(f"by must be 'module' or 'group', got {by!r}")
    out_dir = Path(out_dir)
    index_path = out_dir / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(f"{out_dir} has no {INDEX_FILE}; is it a folder written by export_hessians?")
    index = json.loads(index_path.read_text())
    files = {g: load_hessian(out_dir / name, convention, device) for g, name in index["groups"].items()}
    if by == "group":
        return files
    return {module: files[group] for module, group in index["modules"].items()}
