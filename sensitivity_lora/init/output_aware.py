"""Output-aware initialisation: directions and ranks from what each module's weight does to its inputs.

EVA looks only at the inputs x. A module W (d_out × d_in) can ignore high-variance input
directions and amplify small ones, so here the spectrum is that of the weight applied to the
input statistics, M = S/n (the uncentred second moment, shared per input group). With B = 0 and
A's rows orthonormal, the first gradient step on B changes W by

    ΔW = −η G Aᵀ A,    G = ∂L/∂W = Σ_t δ_t x_tᵀ,   δ_t = ∂L/∂y_t,

so the loss falls at the rate η‖G Aᵀ‖²_F: a good A captures as much of the gradient's energy as
possible. Without labels δ_t is unknown; two models of it give the two variants.

``variant="gradient"`` (default). If the downstream gradient is a random linear read-out of the
module's output, δ_t = K W x_t with E[KᵀK] = I, then E‖G Aᵀ‖² = n²‖W M Aᵀ‖²_F, maximised by

    W M = U Σ Vᵀ,   A = [v_1; …; v_r]   (orthonormal rows),   score_i = σ_i² / Σ_j σ_j²,

the top right singular vectors of W·M (CorDA's IPM decomposes W·C for the same reason; CorDA then
also sets B and subtracts BA from W, here B = 0 and W is untouched). (If δ_t were isotropic noise
independent of x instead, the same argument gives the top eigenvectors of M: EVA, uncentred.)

``variant="whitened"``. The directions that carry the module's output energy E‖W x‖² = tr(W M Wᵀ):

    M + λI = L Lᵀ (Cholesky),  W L = U Σ Vᵀ,   a_i = L⁻ᵀ v_i / ‖L⁻ᵀ v_i‖,   score_i = σ_i² / Σ_j σ_j²,

λ = ``damping`` · tr(M)/d_in (1 % of the mean eigenvalue, ×10 until the factorisation succeeds).
A x then reads the whitened coordinates that feed the output's top singular directions: U_r Σ_r
L⁻¹ x is the best rank-r approximation of W x in output energy (the ASVD / SVD-LLM truncation).
L stands for M^{1/2}: W L and W M^{1/2} have the same singular values, and the spans of
L⁻ᵀ V_r and M^{-1/2} V'_r are the same optimal encoder, at a third of an eigendecomposition's cost.
Caveat: these rows lean towards low-variance inputs (M⁻¹ᐟ² weighting), so B's gradient along them
is smaller than along the gradient variant's.

Ranks (both variants): global greedy over the per-module scores, budget r̄ · #modules, each
module capped at min(round(ρ·r̄), d_in, d_out) and at the directions with σ_i > 0; rank-0 modules
get no adapter. A's rows have unit norm, like EVA's, so the LoRA step-size convention (α/r) means
the same; sign: largest-|.| entry positive. One Gram eigendecomposition per module (on the smaller
side of W·M), one M (and one Cholesky factor) per input group.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .budget import check_whole_rank_budget, greedy_ranks
from .covariance import second_moment
from .decompose import fix_signs, top_eigenpairs
from .state import GroupSums, InitResult, as_group_sums, module_order

VARIANTS = ("gradient", "whitened")
_RELATIVE_ZERO = 1e-12  # σ_i² below this share of σ_1² counts as no direction
_DAMPING_STEPS = 4  # ×10 retries of the Cholesky factorisation


def output_aware_init(weights: Mapping[str, torch.Tensor], groups: Mapping[str, GroupSums | Sequence],
                      avg_rank: int, rho: float = 2.0, *, variant: str = "gradient", damping: float = 0.01,
                      order: Sequence[str] | None = None, solver: str = "auto") -> InitResult:
    """Ranks and A from the spectra of W·M ("gradient") or W·M^{1/2} ("whitened"); see the module doc.

    ``weights``: {module: W (d_out, d_in)}, nn.Linear's layout (transpose GPT-2's Conv1D weights).
    Budget ``avg_rank`` · #modules, per-module cap round(``rho`` · avg_rank).
    """
    groups = as_group_sums(groups)
    order = module_order(groups, order)
    _check(weights, groups, order, avg_rank, rho, variant, damping)
    cap = round(rho * avg_rank)
    scores, directions, solvers = {}, {}, {}
    for name, sums in groups.items():
        moment = second_moment(sums.xtx, sums.n_tokens)
        factor = _damped_cholesky(name, moment, damping) if variant == "whitened" else None
        for m in sums.members:
            w = weights[m].detach().to(device=moment.device, dtype=torch.float64)
            x = w @ moment if factor is None else w @ factor
            k = min(cap, *w.shape)
            values, rows, solvers[m] = _top_right_singular(x, k, solver)
            if factor is not None:  # a_i = L⁻ᵀ v_i: solve Lᵀ a = v
                rows = torch.linalg.solve_triangular(factor.T, rows.T, upper=True).T
                rows = fix_signs(rows / rows.norm(dim=1, keepdim=True))
            total = float(x.square().sum())
            scores[m] = values / total if total > 0 else values
            directions[m] = rows
    budget = avg_rank * len(order)
    ranks = greedy_ranks(scores, budget, order)
    return InitResult(
        method=f"output-aware-{variant}", ranks=ranks,
        components={m: directions[m][: ranks[m]].clone() for m in order},
        scores=scores, budget=budget, decompositions=len(order), solvers=solvers,
        settings={"avg_rank": avg_rank, "rho": rho, "variant": variant, "damping": damping, "solver": solver},
    )


def _top_right_singular(x: torch.Tensor, k: int, solver: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(σ_i², v_i rows, solver) for the top ``k`` right singular vectors of x with σ_i > 0, from the smaller Gram."""
    d_out, d_in = x.shape
    if d_out < d_in:  # eigen of x xᵀ, then v = xᵀ u / σ
        pairs = top_eigenpairs(x @ x.T, k, solver)
        keep = _positive(pairs.values)
        sigma = pairs.values[:keep].sqrt()
        rows = fix_signs((x.T @ pairs.vectors[:keep].T / sigma).T.contiguous())
        return pairs.values[:keep], rows, pairs.method
    pairs = top_eigenpairs(x.T @ x, k, solver)
    keep = _positive(pairs.values)
    return pairs.values[:keep], pairs.vectors[:keep], pairs.method


def _positive(values: torch.Tensor) -> int:
    if values.numel() == 0 or not values[0] > 0:
        return 0
    return int((values > _RELATIVE_ZERO * values[0]).sum())


def _damped_cholesky(name: str, moment: torch.Tensor, damping: float) -> torch.Tensor:
    d = moment.shape[0]
    mean_eigenvalue = float(torch.diagonal(moment).sum()) / d
    if not mean_eigenvalue > 0:
        raise ValueError(f"group {name!r}: the inputs are all zero over the calibration tokens")
    eye = torch.eye(d, dtype=moment.dtype, device=moment.device)
    for step in range(_DAMPING_STEPS):
        factor, info = torch.linalg.cholesky_ex(moment + damping * 10**step * mean_eigenvalue * eye)
        if int(info) == 0:
            return factor
    raise ValueError(f"group {name!r}: the second moment is not positive definite even with damping "
                     f"{damping * 10 ** (_DAMPING_STEPS - 1)} x mean eigenvalue; check the statistics")


def _check(weights: Mapping[str, torch.Tensor], groups: Mapping[str, GroupSums], order: Sequence[str],
           avg_rank: int, rho: float, variant: str, damping: float) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown output-aware variant {variant!r}; choose from {', '.join(VARIANTS)}")
    check_whole_rank_budget(avg_rank, rho)
    if not damping > 0:
        raise ValueError(f"damping must be positive (a share of the mean eigenvalue), got {damping!r}")
    missing = [m for m in order if m not in weights]
    if missing:
        raise ValueError(f"no weight for {len(missing)} modules (e.g. {missing[0]!r}); pass {{module: W}} for all")
    for name, sums in groups.items():
        d_in = sums.xtx.shape[-1]
        for m in sums.members:
            w = weights[m]
            if w.ndim != 2 or w.shape[1] != d_in:
                raise ValueError(f"weight of {m!r} has shape {tuple(w.shape)}, expected (d_out, {d_in}) "
                                 "(nn.Linear layout; transpose Conv1D weights)")
