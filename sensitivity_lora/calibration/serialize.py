"""The on-disk encoding of one input group's statistics (raw fp64 sums as tensors, the rest as JSON),
shared by streaming checkpoints and the Hessian files."""
from __future__ import annotations

import os
from numbers import Integral
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import FileFormatError, MissingInputError
from ..settings import HESSIAN_MODES
from .statistics import GroupStatistics


def group_tensors(group: GroupStatistics, prefix: str = "") -> dict[str, torch.Tensor]:
    """The raw sums of ``group`` as CPU fp64 tensors (``xtx`` full and symmetric)."""
    tensors = {prefix + "sumsq": group.sumsq.detach().to("cpu", torch.float64).contiguous(),
               prefix + "sum": group.sum.detach().to("cpu", torch.float64).contiguous()}
    if group.xtx is not None:
        tensors[prefix + "xtx"] = group.raw_xtx().detach().to("cpu", torch.float64).contiguous()
    return tensors


def group_header(group: GroupStatistics, dims: Mapping[str, tuple[int, int]]) -> dict:
    """JSON-able description of ``group`` (everything but the tensors)."""
    return {
        "group": group.name,
        "members": list(group.members),
        "member_dims": {m: list(dims[m]) for m in group.members if m in dims},
        "d_in": group.d_in,
        "mode": group.mode,
        "n_tokens": group.n_tokens,
        "n_sequences": group.n_sequences,
    }


def group_from(header: Mapping, tensors: Mapping[str, torch.Tensor], prefix: str = "",
               device: torch.device | str = "cpu", backend: str | None = None) -> GroupStatistics:
    """Rebuild a ``GroupStatistics`` from :func:`group_header` + :func:`group_tensors`."""
    group = GroupStatistics(header["group"], list(header["members"]), int(header["d_in"]), header["mode"],
                            torch.device(device), backend)
    group.sumsq = tensors[prefix + "sumsq"].to(device, torch.float64)
    group.sum = tensors[prefix + "sum"].to(device, torch.float64)
    if group.mode == "full":
        group.xtx = tensors[prefix + "xtx"].to(device, torch.float64)
        group._symmetric = True  # stored full and symmetric
    group.n_tokens = int(header["n_tokens"])
    group.n_sequences = int(header["n_sequences"])
    return group


def read_safetensors(path: str | os.PathLike, what: str = "safetensors file") -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors on the CPU) of ``path``; a missing, truncated or foreign file is an error naming it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"no {what} at {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FileFormatError(f"{path} is not a readable {what} ({type(exc).__name__}: {exc}); it may be "
                              "truncated or not a safetensors file: write it again") from None
    return meta, tensors


def _is_count(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= minimum


def check_group(header: Any, tensors: Mapping[str, torch.Tensor], prefix: str, source: Any, fix: str) -> None:
    """Raise FileFormatError (naming ``source``) unless ``header`` + ``tensors`` are a sound group: the
    counts, the shapes (d_in,) and (d_in, d_in), fp64, finite, Σx² and diag(Σxxᵀ) non-negative, Σxxᵀ symmetric."""
    def bad(why: str) -> FileFormatError:
        name = header.get("group") if isinstance(header, Mapping) else None
        return FileFormatError(f"{source}: {'group ' + repr(name) + ': ' if name else ''}{why}; {fix}")

    if not isinstance(header, Mapping):
        raise bad("the group header is not a mapping")
    members = header.get("members")
    if not isinstance(header.get("group"), str) or not isinstance(members, list) or not members \
            or not all(isinstance(m, str) and m for m in members):
        raise bad("the header needs a group name and a non-empty list of member module names")
    d_in = header.get("d_in")
    if not _is_count(d_in, 1):
        raise bad(f"d_in={d_in!r} is not a positive integer")
    if header.get("mode") not in HESSIAN_MODES:
        raise bad(f"mode={header.get('mode')!r} is not one of {', '.join(HESSIAN_MODES)}")
    if not _is_count(header.get("n_tokens"), 1) or not _is_count(header.get("n_sequences"), 1):
        raise bad(f"the token and sequence counts ({header.get('n_tokens')!r}, {header.get('n_sequences')!r}) "
                  "must be positive integers")
    for member, dims in (header.get("member_dims") or {}).items():
        if not (isinstance(dims, (list, tuple)) and len(dims) == 2 and all(_is_count(v, 1) for v in dims)):
            raise bad(f"member {member}: dims {dims!r} are not two positive integers")
        if dims[0] != d_in:
            raise bad(f"member {member} reads {dims[0]} features but the group has d_in={d_in}")
    expected = {"sumsq": (d_in,), "sum": (d_in,)}
    if header["mode"] == "full":
        expected["xtx"] = (d_in, d_in)
    elif prefix + "xtx" in tensors:
        raise bad("it holds a full Σxxᵀ but says mode='diag'")
    for key, shape in expected.items():
        tensor = tensors.get(prefix + key)
        if tensor is None:
            raise bad(f"the tensor {prefix + key!r} is missing")
        if tensor.dtype != torch.float64:
            raise bad(f"{key} has dtype {tensor.dtype}; the raw sums are stored in float64")
        if tuple(tensor.shape) != shape:
            raise bad(f"{key} has shape {tuple(tensor.shape)}, expected {shape}")
        if not bool(torch.isfinite(tensor).all()):
            raise bad(f"{key} holds NaN or infinite values")
    if bool((tensors[prefix + "sumsq"] < 0).any()):
        raise bad("Σx² has negative entries (a sum of squares cannot)")
    if "xtx" in expected:
        xtx = tensors[prefix + "xtx"]
        if bool((torch.diagonal(xtx) < 0).any()):
            raise bad("Σxxᵀ has negative diagonal entries (a sum of squares cannot)")
        if not torch.equal(xtx, xtx.T):
            raise bad("Σxxᵀ is not symmetric")
