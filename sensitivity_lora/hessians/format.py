"""Hessians on disk: one safetensors file per input group, readable by other tools.

Each file holds the raw sums of one input group (``xtx`` = Σ x xᵀ, full and symmetric, when
calibrated with ``hessian="full"``: fp64 by default, or fp32 and/or only its upper triangle as
``xtx_upper``, see ``storage``; ``sumsq`` = Σ x² and ``sum`` = Σ x, always fp64)
and, in its string metadata, the token and sequence counts, the member module
names with their (d_in, d_out), and the project's normalisation convention. The
loader applies any convention of ``calibration.statistics.NORMALISATIONS`` on the way out.
Nothing is pickled: safetensors for tensors, JSON for everything else.

    from sensitivity_lora import export_hessians, load_hessians
    export_hessians(model, batches, "hessians/")                 # streams block by block
    H = load_hessians("hessians/", convention="2/sequences")     # llm-compressor / reference GPTQ (GPTQModel: 2/tokens)
    H["model.layers.0.self_attn.q_proj"].hessian                 # (d_in, d_in) fp64
    export_hessians(model, batches, "h32/", storage_dtype="float32", layout="upper")  # a quarter of the bytes

Format versions: 2 added ``sum``; 3 adds the Σxxᵀ storage options (metadata ``xtx_dtype``,
``xtx_layout``). Version 2 files are version 3 files with the default storage, and still load.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..calibration.serialize import check_group, group_from, group_header, group_tensors, read_safetensors
from ..calibration.statistics import GroupStatistics, normalisation_factor
from ..errors import CheckpointMismatchError, FileFormatError, MissingInputError, OutputExistsError
from ..files import atomic_save_safetensors, atomic_write_json
from ..folders import ensure_output_folder
from .storage import DEFAULT_DTYPE, DEFAULT_LAYOUT, check_storage, pack, unpack

FORMAT = "sensitivity-lora-hessian"
FORMAT_VERSION = "3"  # 2: adds ``sum`` (Σx); 3: Σxxᵀ in fp32 and/or as the upper triangle, on request
READABLE_VERSIONS = ("2", "3")
PROJECT_CONVENTION = "2/tokens"
INDEX_FILE = "index.json"
CHECKPOINT_DIR = "checkpoint"  # the export's resume record (which blocks are written, and the run's fingerprint)
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.safetensors")


# ---------------------------------------------------------------- writing

def group_filename(group: str) -> str:
    """A portable file name for an input group (its leader module's name)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", group) + ".safetensors"


def save_group(path: str | os.PathLike, group: GroupStatistics, dims: Mapping[str, tuple[int, int]],
               storage_dtype: str = DEFAULT_DTYPE, layout: str = DEFAULT_LAYOUT) -> Path:
    """Write one input group's Hessian file (see the module docstring for the layout)."""
    check_storage(storage_dtype, layout)
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
        "xtx_dtype": storage_dtype,
        "xtx_layout": layout,
    }
    atomic_save_safetensors(path, pack(group_tensors(group), storage_dtype, layout), metadata)
    return path


class HessianWriter:
    """Writes groups into ``out_dir`` one at a time and keeps ``index.json`` (module → file) current.

    The index says ``"complete": false`` until :meth:`finish`; readers refuse an incomplete export.
    A folder that already holds an export is never merged into silently: ``resume`` continues it
    (its entries are kept; the checkpoint's fingerprint check refuses a different run before
    anything is written), ``overwrite`` removes it first, and neither raises OutputExistsError.
    Nothing is written before the first :meth:`write` (or :meth:`finish`).
    """

    def __init__(self, out_dir: str | os.PathLike, settings: Mapping | None = None, *, resume: bool = False,
                 overwrite: bool = False, storage_dtype: str = DEFAULT_DTYPE, layout: str = DEFAULT_LAYOUT) -> None:
        check_storage(storage_dtype, layout)
        self.storage = (storage_dtype, layout)
        self.out_dir = ensure_output_folder(out_dir)
        checkpoint = self.out_dir / CHECKPOINT_DIR
        old: dict[str, Any] = {}
        if check_export_folder(self.out_dir, resume, overwrite):
            if resume:
                old = read_index(self.out_dir)
            else:
                remove_export(self.out_dir)
        elif not resume and checkpoint.exists():
            shutil.rmtree(checkpoint)  # a resume record with no export beside it: nothing to keep
        self.index = {"format": FORMAT, "format_version": FORMAT_VERSION, "normalisation": PROJECT_CONVENTION,
                      "complete": False, "groups": dict(old.get("groups", {})), "modules": dict(old.get("modules", {})),
                      "xtx_dtype": storage_dtype, "xtx_layout": layout}
        if settings:
            self.index["settings"] = dict(settings)

    def write(self, groups: Iterable[GroupStatistics], dims: Mapping[str, tuple[int, int]]) -> None:
        for group in groups:
            name = group_filename(group.name)
            save_group(self.out_dir / name, group, dims, *self.storage)
            self.index["groups"][group.name] = name
            for member in group.members:
                self.index["modules"][member] = group.name
        atomic_write_json(self.out_dir / INDEX_FILE, self.index)

    def finish(self) -> None:
        """Mark the export complete (the last write of a run)."""
        self.index["complete"] = True
        atomic_write_json(self.out_dir / INDEX_FILE, self.index)


def check_export_folder(out_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> bool:
    """Whether ``out_dir`` holds an export already; raises when this run may not write there (it holds one
    and neither ``resume`` nor ``overwrite`` is given, or ``resume`` has no checkpoint to check against).
    Changes nothing."""
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume continues the export in the folder, "
                         "overwrite replaces it")
    if not (out_dir / INDEX_FILE).exists():
        return False
    if resume and not (out_dir / CHECKPOINT_DIR / "manifest.json").is_file():
        raise CheckpointMismatchError(
            f"{out_dir} holds Hessians but no checkpoint ({CHECKPOINT_DIR}/manifest.json), so nothing says which "
            "model, data and settings they came from: they cannot be resumed. Pass overwrite (--overwrite) to "
            "replace them, or choose another folder")
    if not resume and not overwrite:
        raise OutputExistsError(
            f"{out_dir} already holds a Hessian export; a new run would mix its files with the old ones. Pass "
            "resume (--resume) to continue that run, overwrite (--overwrite) to replace it, or choose another folder")
    return True


def remove_export(out_dir: str | os.PathLike) -> None:
    """Delete an export's files (those its index lists, the index, the checkpoint); other files stay."""
    out_dir = Path(out_dir)
    try:
        index = json.loads((out_dir / INDEX_FILE).read_text(encoding="utf-8"))
        names = list(index.get("groups", {}).values()) if isinstance(index, dict) else []
    except (OSError, ValueError, AttributeError):
        names = []
    for name in names:
        if isinstance(name, str) and _FILE_NAME.fullmatch(name):
            (out_dir / name).unlink(missing_ok=True)
    (out_dir / INDEX_FILE).unlink(missing_ok=True)
    shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)


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


def _int(meta: Mapping[str, str], key: str, path: Path) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        raise FileFormatError(f"{path}: metadata {key}={meta.get(key)!r} is not an integer; export it again") from None


def _json(meta: Mapping[str, str], key: str, path: Path, default: str | None = None) -> Any:
    try:
        return json.loads(meta[key] if default is None else meta.get(key, default))
    except (KeyError, ValueError):
        raise FileFormatError(f"{path}: metadata {key!r} is missing or not JSON; export it again") from None


def load_hessian(path: str | os.PathLike, convention: str = PROJECT_CONVENTION,
                 device: torch.device | str = "cpu") -> HessianFile:
    """Read one file written by :func:`save_group`; every field is checked (FileFormatError naming the file)."""
    normalisation_factor(convention, 1, 1)  # fail early on an unknown convention
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"no Hessian file at {path}" + (" (it is a folder)" if path.is_dir() else ""))
    meta, tensors = read_safetensors(path, "Hessian file")
    if meta.get("format") != FORMAT:
        raise FileFormatError(f"{path} is not a sensitivity-lora Hessian file (format={meta.get('format')!r})")
    if meta.get("format_version", "2") not in READABLE_VERSIONS:
        raise FileFormatError(f"{path} is format version {meta.get('format_version')!r}; this sensitivity-lora reads "
                              f"versions {', '.join(READABLE_VERSIONS)}: upgrade it, or export again")
    if meta.get("stored") != "raw_sum":
        raise FileFormatError(f"{path} stores {meta.get('stored')!r}; this reader understands only 'raw_sum'")
    if "sum" not in tensors:
        raise FileFormatError(f"{path} has no 'sum' tensor (format version {meta.get('format_version')}); "
                              "export it again with this version of sensitivity-lora")
    tensors = unpack(meta, tensors, path)  # Σxxᵀ back as the full fp64 matrix, whatever was stored
    members = _json(meta, "members", path)
    member_dims = _json(meta, "member_dims", path, "{}")
    header = {"group": meta.get("group"), "members": members, "member_dims": member_dims,
              "d_in": _int(meta, "d_in", path), "mode": meta.get("mode"),
              "n_tokens": _int(meta, "n_tokens", path), "n_sequences": _int(meta, "n_sequences", path)}
    check_group(header, tensors, "", path, "export it again")
    if not isinstance(member_dims, dict):
        raise FileFormatError(f"{path}: metadata 'member_dims' is not a mapping; export it again")
    dims = {k: (int(v[0]), int(v[1])) for k, v in member_dims.items()}
    xtx = tensors.get("xtx")
    return HessianFile(header["group"], list(members), dims, header["n_tokens"], header["n_sequences"], convention,
                       tensors["sumsq"].to(device), xtx.to(device) if xtx is not None else None,
                       tensors["sum"].to(device))


def _member_name(out_dir: Path, name: Any, index_path: Path) -> Path:
    """``out_dir / name`` for a plain file name from the index; names that leave the folder are refused."""
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
        raise FileFormatError(f"{index_path} names the file {name!r}: an export's files are plain "
                              "'<group>.safetensors' names inside its folder (no paths, no '..')")
    path = out_dir / name
    if path.resolve().parent != out_dir.resolve():
        raise FileFormatError(f"{index_path}: {name!r} leads outside {out_dir} (a link); refusing to follow it")
    return path


def read_index(out_dir: str | os.PathLike) -> dict[str, Any]:
    """An export's ``index.json``, checked: its format, groups → plain file names inside the folder,
    modules → groups it lists."""
    out_dir = Path(out_dir)
    index_path = out_dir / INDEX_FILE
    if not index_path.is_file():
        raise MissingInputError(f"{out_dir} has no {INDEX_FILE}; is it a folder written by export_hessians?")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FileFormatError(f"{index_path} is not readable JSON ({exc}); export the Hessians again") from None
    if not isinstance(index, dict) or index.get("format", FORMAT) != FORMAT:
        raise FileFormatError(f"{index_path} is not the index of a sensitivity-lora Hessian export")
    groups, modules = index.get("groups"), index.get("modules")
    if not isinstance(groups, dict) or not isinstance(modules, dict):
        raise FileFormatError(f"{index_path} needs 'groups' (group → file) and 'modules' (module → group) mappings")
    for group, name in groups.items():
        _member_name(out_dir, name, index_path)
    for module, group in modules.items():
        if group not in groups:
            raise FileFormatError(f"{index_path}: module {module} belongs to group {group!r}, which it does not list")
    return index


def load_hessians(out_dir: str | os.PathLike, convention: str = PROJECT_CONVENTION,
                  device: torch.device | str = "cpu", by: str = "module") -> dict[str, HessianFile]:
    """All Hessians of an export folder, keyed by module name (``by="module"``) or group (``by="group"``).

    The index and every file are checked (names inside the folder only, shapes, dtypes, finite values);
    an export that is still running or was interrupted (``"complete": false``) is refused."""
    if by not in ("module", "group"):
        raise ValueError(f"by must be 'module' or 'group', got {by!r}")
    out_dir = Path(out_dir)
    index = read_index(out_dir)
    if index.get("complete") is False:
        raise FileFormatError(f"the export in {out_dir} is incomplete (still running, or interrupted): resume it "
                              "(export_hessians(..., resume=True) or `sensitivity-lora hessians --resume`)")
    files = {}
    for group, name in index["groups"].items():
        path = _member_name(out_dir, name, out_dir / INDEX_FILE)
        files[group] = load_hessian(path, convention, device)
        if files[group].group != group:
            raise FileFormatError(f"{path} holds group {files[group].group!r}, but {INDEX_FILE} lists it as {group!r}")
    if by == "group":
        return files
    return {module: files[group] for module, group in index["modules"].items()}
