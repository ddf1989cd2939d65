"""The on-disk encoding of one input group's statistics (raw fp64 sums as tensors, the rest as JSON),
shared by streaming checkpoints and the Hessian files."""
from __future__ import annotations

from typing import Mapping

import torch

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
