"""EVA (Explained Variance Adaptation, PEFT ``peft/tuners/lora/eva.py``) computed from calibration sums.

PEFT's EVA runs the model over the data repeatedly, fitting an incremental randomised PCA to
each target's inputs until its components stop moving. The same answer, exactly, comes from one
eigendecomposition of each input group's centred covariance C = (S − nμμᵀ)/(n − 1). The rule,
as PEFT 0.21.2 implements it (read from its source, not copied):

1. Configured ranks r_m⁰ = ``rank_pattern[m]`` or ``r``; budget R = Σ_m r_m⁰ (= r·#modules).
2. Cap k_m = round(r_m⁰ · ρ) (Python's round, halves to even), raised to the largest cap in
   the module's input group (PEFT: ``equal_inputs_map``, inputs compared by hash on the first
   batch; here: the calibration's input groups). For ρ > 1000 PEFT first lowers ρ to
   min(ρ, max_dim // r), max_dim the largest dimension of any model parameter (``max_param_dim``).
3. Per group, the top max_m k_m eigenpairs (λ_i, v_i) of C; explained-variance ratios
   λ_i / tr(C) (denominator: the total variance, all eigenvalues). Members share them.
4. Ranks: each module offers its first k_m ratios; the R largest over all modules win and a
   module's rank is how many of its own won (:mod:`.budget`, ties by model order, which
   satisfies PEFT's "the group's first member holds the most").
5. A_m = v_1..v_{r_m} as rows (unit norm, largest-|.| entry positive: PEFT's ``svd_flip`` on
   Vᵀ), B = 0; ``whiten`` divides row i by √S_i, S_i = √((n−1)λ_i) the i-th singular value of
   the centred data matrix (PEFT: ``components_ / singular_values_.sqrt()``).
6. Modules with rank 0 get no adapter; with ``adjust_scaling_factors`` (PEFT's default) the
   loader sets α_m = lora_alpha · r_m / r_m⁰ (:func:`.state.alpha_pattern`), so α/r is constant.

Differences from PEFT, all deliberate: PEFT's PCA is approximate (randomised ``svd_lowrank``,
stopped once consecutive batches' components have cosine ≥ τ, on the batches seen until then,
cycling the data if needed); here it is exact over all calibration tokens. PEFT raises when
k_m exceeds the input width; so does this. ``whiten`` changes only the rows' lengths, and
PEFT's lengths are not reproducible: its singular values grow with the number of (possibly
repeated) samples its PCA saw, and for members sharing an input it divides the shared component
tensor in place once per member, so a group's rows end up divided several times (measured on a
tiny Llama: q/k/v rows 0.0035–0.01 × ours, single modules 2^{-1/4} × ours after one repeat of the
data). Here each module's rows are divided once, by ((n−1)λ_i)^{1/4}. Ties at the budget cut
(members of a group share their ratios) are left to an unstable ``argsort`` in PEFT and go to
the earlier member here: a group's ranks are the same multiset, possibly on other members.
``tau`` has no counterpart (nothing is iterated); label masks (``use_label_mask``) are the
calibration's business: the sums must already exclude those tokens.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from . import pca
from .budget import greedy_ranks
from .state import GroupSums, InitResult, as_group_sums, module_order

RHO_THRESHOLD = 1000  # PEFT's limit above which ρ is cut to max_dim // r


def eva_init(groups: Mapping[str, GroupSums | Sequence], r: int, rho: float = 2.0, *,
             rank_pattern: Mapping[str, int] | None = None, whiten: bool = False, order: Sequence[str] | None = None,
             max_param_dim: int | None = None, solver: str = "auto") -> InitResult:
    """PEFT EVA's ranks and A matrices from ``{group: (Σxxᵀ, Σx, n_tokens, members)}``.

    ``r``, ``rho``, ``rank_pattern`` (exact module names), ``whiten`` mean what they mean in
    ``LoraConfig(r=..., rank_pattern=...)`` / ``EvaConfig(rho=..., whiten=...)``. ``order`` is the
    model order of the modules (ties; default: group by group, members in their order).
    ``max_param_dim`` matters only for ρ > 1000 (default: the widest input). One eigendecomposition
    per group (``result.decompositions``).
    """
    groups = as_group_sums(groups)
    order = module_order(groups, order)
    _check_settings(r, rho, rank_pattern, order)
    rank_pattern = dict(rank_pattern or {})
    rho = _effective_rho(rho, r, groups, max_param_dim)
    base = {m: rank_pattern.get(m, r) for m in order}
    caps = {m: round(base[m] * rho) for m in order}
    for sums in groups.values():  # PEFT: modules with equal inputs get the group's largest cap
        top = max(caps[m] for m in sums.members)
        caps.update(dict.fromkeys(sums.members, top))
    fits = pca.group_pcas(groups, {name: caps[sums.members[0]] for name, sums in groups.items()}, solver)
    owner = {m: name for name, sums in groups.items() for m in sums.members}
    scores = {m: fits[owner[m]].ratios[: caps[m]] for m in order}
    budget = sum(base.values())
    ranks = greedy_ranks(scores, budget, order)
    components = {m: _rows(fits[owner[m]], ranks[m], whiten) for m in order}
    return InitResult(
        method="eva", ranks=ranks, components=components, scores=scores, budget=budget,
        decompositions=len(fits), solvers={name: fit.method for name, fit in fits.items()},
        settings={"r": r, "rho": rho, "rank_pattern": rank_pattern, "whiten": whiten, "solver": solver},
    )


def _rows(fit: pca.GroupPCA, rank: int, whiten: bool) -> torch.Tensor:
    rows = fit.vectors[:rank].clone()
    if whiten and rank:
        singular = torch.sqrt(fit.values[:rank].clamp_min(0.0) * (fit.n_tokens - 1))
        rows /= singular.sqrt()[:, None]
    return rows


def _effective_rho(rho: float, r: int, groups: Mapping[str, GroupSums], max_param_dim: int | None) -> float:
    if rho <= RHO_THRESHOLD:
        return rho
    max_dim = max_param_dim if max_param_dim is not None else max(s.xtx.shape[-1] for s in groups.values())
    return min(rho, max_dim // r)


def _check_settings(r: int, rho: float, rank_pattern: Mapping[str, int] | None, order: Sequence[str]) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive integer (LoRA's rank), got {r!r}")
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not rho >= 1.0:
        raise ValueError(f"rho must be a number >= 1.0 (as in PEFT's EvaConfig), got {rho!r}")
    unknown = sorted(set(rank_pattern or {}) - set(order))
    if unknown:
        raise ValueError(f"rank_pattern names modules that are not targets: {unknown[:3]}; use exact module names")
    bad = {m: v for m, v in (rank_pattern or {}).items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise ValueError(f"rank_pattern values must be positive integers, got {bad}")
