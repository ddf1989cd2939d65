"""How Σxxᵀ is stored in a Hessian file: fp64 or fp32, the full matrix or its upper triangle.

The defaults (fp64, full) are format version 2's layout. fp32 halves the file and is what the GPTQ
tools compute in anyway (their H is fp32); the upper triangle halves it again, since Σxxᵀ is
symmetric (fp32 + upper: a quarter, e.g. ~190 MB instead of 770 MB for SmolLM2-135M). The reader
restores the full fp64 matrix whatever was stored, so every consumer sees the same type.

Upper layout: the tensor ``xtx_upper`` holds the rows of the upper triangle one after another
(row r from column r on), length d(d+1)/2: what ``torch.triu_indices(d, d)`` enumerates.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ..errors import FileFormatError

DTYPES = {"float64": torch.float64, "float32": torch.float32}
LAYOUTS = ("full", "upper")
DEFAULT_DTYPE, DEFAULT_LAYOUT = "float64", "full"


def check_storage(dtype: str, layout: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"storage_dtype: the storage dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout: the storage layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def pack(tensors: dict[str, torch.Tensor], dtype: str = DEFAULT_DTYPE, layout: str = DEFAULT_LAYOUT) -> dict[str, torch.Tensor]:
    """``tensors`` (from ``group_tensors``: fp64, ``xtx`` full) with ``xtx`` in the chosen storage."""
    check_storage(dtype, layout)
    xtx = tensors.get("xtx")
    if xtx is None:
        return tensors
    out = {k: v for k, v in tensors.items() if k != "xtx"}
    if layout == "upper":  # row by row: index tensors for a d×d triangle would cost more than the matrix
        out["xtx_upper"] = torch.cat([xtx[r, r:] for r in range(xtx.shape[0])]).to(DTYPES[dtype]).contiguous()
    else:
        out["xtx"] = xtx.to(DTYPES[dtype]).contiguous()
    return out


def unpack(meta: Mapping[str, str], tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The stored tensors with ``xtx`` back as the full fp64 matrix (files without storage metadata: fp64, full)."""
    dtype, layout = meta.get("xtx_dtype", DEFAULT_DTYPE), meta.get("xtx_layout", DEFAULT_LAYOUT)
    if dtype not in DTYPES or layout not in LAYOUTS:
        raise FileFormatError(f"{path}: unknown Σxxᵀ storage {dtype!r}/{layout!r} (written by a newer "
                              "sensitivity-lora?); export it again with this version")
    key = "xtx_upper" if layout == "upper" else "xtx"
    other = "xtx" if layout == "upper" else "xtx_upper"
    if other in tensors:
        raise FileFormatError(f"{path} holds {other!r} but its metadata says the layout is {layout!r}; export it again")
    if key not in tensors:
        return tensors  # a diagonal-only file (check_group decides whether that fits its mode)
    stored = tensors[key]
    if stored.dtype != DTYPES[dtype]:
        raise FileFormatError(f"{path}: {key} has dtype {stored.dtype}, but its metadata says {dtype}; export it again")
    out = {k: v for k, v in tensors.items() if k != key}
    if layout == "full":
        out["xtx"] = stored.to(torch.float64)
        return out
    d = tensors["sumsq"].numel() if "sumsq" in tensors else 0
    if stored.dim() != 1 or stored.numel() != d * (d + 1) // 2:
        raise FileFormatError(f"{path}: xtx_upper has shape {tuple(stored.shape)}, expected ({d * (d + 1) // 2},) "
                              f"for d_in={d}; export it again")
    full = torch.empty(d, d, dtype=torch.float64)
    start = 0
    for r in range(d):
        row = stored[start:start + d - r].to(torch.float64)
        full[r, r:] = row
        full[r:, r] = row
        start += d - r
    out["xtx"] = full
    return out
