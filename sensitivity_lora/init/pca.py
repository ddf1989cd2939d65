"""Principal components of one input group: the top-k eigenpairs of its centred covariance.

    C = (S − n μμᵀ)/(n − 1)  =  Σ_i λ_i v_i v_iᵀ,   λ_1 ≥ λ_2 ≥ …
    explained-variance ratio   ρ_i = λ_i / tr(C) = λ_i / Σ_{all j} λ_j

The denominator is the *total* variance (the trace, every eigenvalue), not the sum of the k
kept: PEFT's IncrementalPCA divides S_i² by Σ_features n·var (the trace of the centred
scatter), which is the same ratio. One decomposition per group; every member reads it.
:func:`group_pcas` decomposes many groups together (the block solver batches the groups of
one width), building their covariances a batch at a time so that memory stays bounded.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .covariance import centred_covariance
from .decompose import BLOCK_BATCH_BYTES, Eigenpairs, memory_batches, top_eigenpairs_many
from .state import GroupSums


@dataclass(frozen=True)
class GroupPCA:
    """Top-k principal directions of one group: ``vectors`` (k, d) rows, ``values`` λ_i of C, ``ratios``."""

    values: torch.Tensor
    vectors: torch.Tensor
    ratios: torch.Tensor
    total_variance: float  # tr(C)
    n_tokens: int
    method: str  # the eigen solver used


def group_pca(name: str, sums: GroupSums, k: int, solver: str = "auto") -> GroupPCA:
    """The top ``k`` principal components of group ``name`` (k ≤ d_in and k < n_tokens)."""
    return group_pcas({name: sums}, {name: k}, solver)[name]


def group_pcas(groups: Mapping[str, GroupSums], ks: Mapping[str, int], solver: str = "auto") -> dict[str, GroupPCA]:
    """:func:`group_pca` of every group named in ``ks`` (``ks[name]`` components), decomposed together."""
    for name, k in ks.items():
        _check(name, groups[name], k)
    by_width: dict[tuple, list[str]] = {}
    for name in ks:
        xtx = groups[name].xtx
        by_width.setdefault((xtx.shape[-1], str(xtx.device)), []).append(name)
    fits = {}
    for (d, _), names in by_width.items():
        for batch in memory_batches(names, d * d * 8, BLOCK_BATCH_BYTES):  # fp64 covariances, a batch at a time
            covs = [centred_covariance(groups[n].xtx, groups[n].total, groups[n].n_tokens) for n in batch]
            traces = [float(torch.diagonal(c).sum()) for c in covs]
            for n, trace in zip(batch, traces):
                if not trace > 0.0:
                    raise ValueError(f"group {n!r}: the inputs have no variance (constant over the calibration tokens)")
            pairs = top_eigenpairs_many(covs, [ks[n] for n in batch], solver)
            fits.update({n: _fit(p, t, groups[n].n_tokens) for n, p, t in zip(batch, pairs, traces)})
    return {name: fits[name] for name in ks}


def _fit(pairs: Eigenpairs, trace: float, n_tokens: int) -> GroupPCA:
    return GroupPCA(pairs.values, pairs.vectors, pairs.values / trace, trace, n_tokens, pairs.method)


def _check(name: str, sums: GroupSums, k: int) -> None:
    d = sums.xtx.shape[-1]
    if k > d:
        raise ValueError(f"group {name!r}: {k} components were asked of a {d}-feature input; "
                         "ask for fewer (lower r, rho or the module's rank)")
    if sums.n_tokens <= k:
        raise ValueError(f"group {name!r}: {sums.n_tokens} tokens cannot give {k} principal components; "
                         "calibrate on more text or ask for fewer components")
