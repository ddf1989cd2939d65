"""Covariance initialisation for ranks chosen elsewhere (e.g. Sensitivity-LoRA's allocation).

Given any ranks {m: r_m} (Sensitivity-LoRA's SRA/PRA, uniform, ...), each module's adapter
starts as

    A_m = [v_1; …; v_{r_m}]   (r_m × d_in),   B_m = 0,

v_i the unit-norm top eigenvectors of the centred input covariance C_g = (S_g − n μ_g μ_gᵀ)/(n − 1)
of the module's input group g (sign: largest-|.| entry positive). This is EVA's initialisation
with the rank rule replaced: the Hessian trace decides how much capacity a module gets, the
input's principal directions decide where it starts. With B = 0 the first step's update of B is
∂L/∂B = Σ_t δ_t (A x_t)ᵀ, so an A spanning the high-variance input directions lets B learn fastest
where the inputs carry energy. Rank-0 modules get no adapter. One decomposition per group, for
the largest rank among its members; every member takes a prefix.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from . import pca
from .state import GroupSums, InitResult, as_group_sums, module_order


def covariance_init(groups: Mapping[str, GroupSums | Sequence], ranks: Mapping[str, int], *,
                    order: Sequence[str] | None = None, solver: str = "auto") -> InitResult:
    """A = the top-r_m centred-covariance eigenvectors of each module's input group, B = 0."""
    groups = as_group_sums(groups)
    order = module_order(groups, order)
    missing = [m for m in order if m not in ranks]
    unknown = sorted(set(ranks) - set(order))
    if missing or unknown:
        raise ValueError(f"ranks must cover exactly the group members: missing {missing[:3]}, unknown {unknown[:3]}")
    bad = {m: v for m, v in ranks.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
    if bad:
        raise ValueError(f"ranks must be non-negative integers, got {dict(list(bad.items())[:3])}")
    wanted = {name: max(ranks[m] for m in sums.members) for name, sums in groups.items()}
    fits = pca.group_pcas(groups, {name: k for name, k in wanted.items() if k > 0}, solver)
    owner = {m: name for name, sums in groups.items() for m in sums.members}
    components, scores = {}, {}
    for m in order:
        fit = fits.get(owner[m])
        d_in = groups[owner[m]].xtx.shape[-1]
        components[m] = fit.vectors[: ranks[m]].clone() if fit else groups[owner[m]].xtx.new_zeros(0, d_in).double()
        scores[m] = fit.ratios[: ranks[m]].clone() if fit else components[m].new_zeros(0)
    return InitResult(
        method="covariance", ranks={m: int(ranks[m]) for m in order}, components=components, scores=scores,
        budget=sum(ranks.values()), decompositions=len(fits),
        solvers={name: fit.method for name, fit in fits.items()}, settings={"solver": solver},
    )
