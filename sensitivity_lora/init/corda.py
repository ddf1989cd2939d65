"""The covariance file PEFT's CorDA reads (``CordaConfig(covariance_file=...)``), from calibration sums.

What PEFT 0.21.2 expects (``peft/tuners/lora/corda.py``, ``calib_cov_distribution``): when the
file exists and is not empty, ``preprocess_corda`` loads it with ``torch.load(path,
map_location=<model device>)`` and never runs the model. The content is a plain dict

    {module name: covariance (d_in, d_in)}

with one entry per CorDA target (``nn.Linear`` / ``Conv1D`` matching ``target_modules``), keyed by
``model.named_modules()`` of the model given to ``preprocess_corda`` (normally the base model,
before ``get_peft_model``: names like "model.layers.0.self_attn.q_proj"); a missing target is a
KeyError there. CorDA casts it with ``.float()``; fp32 is what its own collection saves.

Normalisation. CorDA's own collection hooks each target, and for every forward call c takes the
call's inputs X_c (its hook squeezes the batch dimension, so it expects one sequence per call and
counts padding tokens), divides them by |max X_c| (the largest entry, not the largest magnitude)
and saves mean_c X_cᵀ X_c / |max X_c|²: the uncentred second moment summed over a sequence,
rescaled per call. Written here: M = scale · S / n (S = Σxxᵀ over the non-padding tokens, n their
count), the per-token second moment, the same for every member of an input group. The adapter
product B·A and the residual weight CorDA builds are invariant to a constant factor on the
covariance (its damping is 1 % of the mean diagonal, relative), but A and B separately scale by
c^{-1/2} and c^{1/2}: to reproduce CorDA's magnitudes pass ``scale`` ≈ T / m² (T tokens per
sequence, m the typical |max x|). Only the relative weighting of sequences (CorDA's per-call max)
cannot be reproduced from sums.

Security and size: PEFT reads this file with ``torch.load`` (pickle, the ``weights_only``
default of the installed torch applies); only load files you wrote. This package writes a dict of
plain tensors only. Members of one input group share one tensor object, which ``torch.save``
stores once, so the file holds one d_in² matrix per input group, not per module.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..files import atomic_write
from .covariance import second_moment
from .state import GroupSums, as_group_sums


def corda_covariances(groups: Mapping[str, GroupSums | Sequence], *, prefix: str = "", scale: float = 1.0,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``{prefix + module: scale · S/n}`` for every member of every group (members share one tensor)."""
    groups = as_group_sums(groups)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    out = {}
    for sums in groups.values():
        matrix = (second_moment(sums.xtx, sums.n_tokens) * scale).to(dtype).cpu().contiguous()
        for m in sums.members:
            out[prefix + m] = matrix
    return out


def write_corda_covariance_file(path: str | os.PathLike, groups: Mapping[str, GroupSums | Sequence], *,
                                prefix: str = "", scale: float = 1.0, dtype: torch.dtype = torch.float32) -> Path:
    """Write :func:`corda_covariances` to ``path`` for ``CordaConfig(covariance_file=path)``; atomic."""
    path = Path(path)
    covariances = corda_covariances(groups, prefix=prefix, scale=scale, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    # written beside the target and renamed, so a crash never leaves a half file CorDA would try to load
    return atomic_write(path, lambda tmp: torch.save(covariances, tmp))
