"""Principal components of one input group: the top-k eigenpairs of its centred covariance.

    C = (S − n μμᵀ)/(n − 1)  =  Σ_i λ_i v_i v_iᵀ,   λ_1 ≥ λ_2 ≥ …
    explained-variance ratio   ρ_i = λ_i / tr(C) = λ_i / Σ_{all j} λ_j

The denominator is the *total* variance (the trace, every eigenvalue), not the sum of the k
kept: PEFT's IncrementalPCA divides S_i² by Σ_features n·var (the trace of the centred
scatter), which is the same ratio. One decomposition per group; every member reads it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .covariance import centred_covariance
from .decompose import top_eigenpairs
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
    d = sums.xtx.shape[-1]
    if k > d:
        raise ValueError(f"group {name!r}: {k} components were asked of a {d}-feature input; "
                         "ask for fewer (lower r, rho or the module's rank)")
    if sums.n_tokens <= k:
        raise ValueError(f"group {name!r}: {sums.n_tokens} tokens cannot give {k} principal components; "
                         "calibrate on more text or ask for fewer components")
    cov = centred_covariance(sums.xtx, sums.total, sums.n_tokens)
    trace = float(torch.diagonal(cov).sum())
    if not trace > 0.0:
        raise ValueError(f"group {name!r}: the inputs have no variance (constant over the calibration tokens)")
    pairs = top_eigenpairs(cov, k, solver)
    return GroupPCA(pairs.values, pairs.vectors, pairs.values / trace, trace, sums.n_tokens, pairs.method)
