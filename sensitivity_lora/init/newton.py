"""Newton initialisation: ranks and A from the labelled gradient whitened by the input statistics.

For a linear layer y = W x with gradient G = ∂L/∂W (d_out × d_in, the mean loss of labelled
calibration batches) and input second moment H = S/n (S = Σxxᵀ over the non-padding tokens),
damped as GPTQ damps it (H + λI, λ = ``damping`` · mean diag(H), 1 %), the local quadratic model
with identity output curvature is

    q(Δ) = ⟨G, Δ⟩ + ½ ‖Δ H^{1/2}‖²_F = ⟨G, Δ⟩ + ½ tr(Δ H Δᵀ).

With any P such that P Pᵀ = H⁻¹ (P = H^{-1/2}, or P = L^{-T} from H = L Lᵀ) and Z = Δ P^{-T},
q = ⟨K, Z⟩ + ½‖Z‖²_F with K = G P = U Σ Vᵀ, so (Eckart–Young) the best Δ of rank ≤ r is

    Δ* = −U_r Σ_r V_rᵀ Pᵀ = −G Aᵀ A,   A = V_rᵀ Pᵀ (r × d_in),   q(Δ*) = −½ Σ_{i≤r} σ_i².

(G Aᵀ A = K V_r V_rᵀ Pᵀ = U_r Σ_r V_rᵀ Pᵀ.) A does not depend on which square root P is
(L^{-T} V'_r = H^{-1/2} V_r for the Cholesky one), so the Cholesky factor is used: on SmolLM2-135M
it took 0.01 s (d = 576) and 0.12 s (d = 1536) against eigh's 0.09 s and 1.5 s, and the whole
``newton_init`` 16.7 s against 68.9 s with ``whitening="eigh"`` (the symmetric H^{-1/2}), same
ranks, principal cosines ≥ 1 − 1e-15 (one loaded CPU thread).
With B = 0, LoRA's first gradient step on B is ΔW = −η s² G Aᵀ A: the rank-r Newton step in the
H-norm, up to the step size. Direction i lowers q by ½σ_i² (loss units, comparable across
modules), so the ranks are a global greedy over all modules' σ_i² (:func:`.budget.greedy_ranks`),
at most min(round(ρ·r̄), d_in, d_out) per module, Σ r = r̄·M exactly; rank-0 modules get no adapter.

A's rows are scaled to unit Euclidean norm by default (``normalise="rows"``; sign: largest-|.|
entry positive): the rows of V_rᵀ Pᵀ have lengths ~ 1/RMS(x) along their directions, 100× apart
between layers with massive activations and ordinary ones, while LoRA's α/r and Adam's learning
rate are tuned for unit-scale rows (PEFT's Kaiming rows, EVA's orthonormal ones). Unit rows keep
the row space (the optimal rank-r subspace: Δ* = B* A for B* = −U_r Σ_r D, D the row lengths),
but the first SGD step weighs direction i by σ_i·d_i⁻² instead of σ_i; ``normalise="none"`` keeps
A = V_rᵀ Pᵀ exactly (first step exactly along Δ*). ``normalise="gain"`` scales each row so that its
E[(a·x)²] equals that of a row of PEFT's default A, tr(M)/(3d): the adapter's output then moves per
Adam step as far as plain LoRA's, so only the directions differ and plain LoRA's learning rate carries
over (docs/results.md measures how far a covariance start moves it otherwise).

Cost: one damped Cholesky (or eigh) of H per input group, shared by its members; per module a
triangular solve for K and the top k eigenpairs of K's smaller Gram matrix (the package's
``top_eigenpairs``: ARPACK's Lanczos for d ≥ 256), measured on SmolLM2-135M's real K (k = 8, one
loaded thread) at 0.007–0.07 s per module against 0.02–0.42 s for a full fp64 SVD, 0.01–0.31 s
fp32, 0.01–0.14 s for ``torch.svd_lowrank`` (q = 18, 4 power iterations).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .budget import check_whole_rank_budget, greedy_ranks
from .covariance import default_gain_rows, second_moment
from .decompose import fix_signs
from .output_aware import _damped_cholesky, _top_right_singular
from .state import GroupSums, InitResult, as_group_sums, module_order

WHITENINGS = ("cholesky", "eigh")
NORMALISATIONS = ("rows", "none", "gain")


class Whitener:
    """One input group's P with P Pᵀ = (H + λI)⁻¹: ``whiten(G) = G P`` and ``unwhiten(V) = V Pᵀ`` (rows)."""

    def __init__(self, name: str, sums: GroupSums, damping: float, whitening: str) -> None:
        moment = second_moment(sums.xtx, sums.n_tokens)
        self.whitening = whitening
        if whitening == "cholesky":  # the package's damping ladder (1 % of the mean diagonal, ×10 on failure)
            self.factor = _damped_cholesky(name, moment, damping)
        else:
            d = moment.shape[0]
            mean_diagonal = float(torch.diagonal(moment).sum()) / d
            if not mean_diagonal > 0:
                raise ValueError(f"group {name!r}: the inputs are all zero over the calibration tokens")
            eye = torch.eye(d, dtype=moment.dtype, device=moment.device)
            values, vectors = torch.linalg.eigh(moment + damping * mean_diagonal * eye)
            if not float(values[0]) > 0:
                raise ValueError(f"group {name!r}: the damped second moment is not positive definite")
            self.factor = (vectors * values.rsqrt()) @ vectors.T  # H^{-1/2}, symmetric
            self.factor = (self.factor + self.factor.T) * 0.5

    def whiten(self, g: torch.Tensor) -> torch.Tensor:
        """K = G P (d_out × d_in)."""
        if self.whitening == "cholesky":  # G L^{-T}: solve L Kᵀ = Gᵀ
            return torch.linalg.solve_triangular(self.factor, g.T, upper=False).T
        return g @ self.factor

    def unwhiten(self, rows: torch.Tensor) -> torch.Tensor:
        """A = V Pᵀ for right singular vectors V of K given as rows (k × d_in)."""
        if self.whitening == "cholesky":  # rows of V L^{-1}: solve Lᵀ aᵢ = vᵢ
            return torch.linalg.solve_triangular(self.factor.T, rows.T, upper=True).T
        return rows @ self.factor


def newton_init(gradients: Mapping[str, torch.Tensor], groups: Mapping[str, GroupSums | Sequence],
                avg_rank: int, rho: float = 2.0, *, damping: float = 0.01, whitening: str = "cholesky",
                normalise: str = "rows", order: Sequence[str] | None = None, solver: str = "auto") -> InitResult:
    """Ranks and A (B = 0) from each module's gradient G and its input group's sums; see the module doc.

    ``gradients``: {module: G (d_out, d_in)} in nn.Linear's layout (transpose Conv1D's), the gradient
    of the mean calibration loss. ``groups``: {group: GroupSums(Σxxᵀ, Σx or None, n, members)}.
    Budget ``avg_rank`` · #modules, per-module cap min(round(``rho`` · avg_rank), d_in, d_out).
    ``result.scores[m]`` are the σ_i² of G·P (the quadratic model's decrease is ½σ_i² per
    direction) up to the cap; ``result.decompositions`` counts the per-group factorisations.
    """
    groups = as_group_sums(groups)
    order = module_order(groups, order)
    _check(gradients, groups, order, avg_rank, rho, damping, whitening, normalise)
    cap = round(rho * avg_rank)
    scores, directions, solvers = {}, {}, {}
    for name, sums in groups.items():
        whitener = _whitener(name, sums, damping, whitening)  # once per group, shared by its members
        for m in sums.members:
            g = gradients[m].detach().to(device=whitener.factor.device, dtype=torch.float64)
            k = min(cap, *g.shape)
            values, rows, solvers[m] = _top_right_singular(whitener.whiten(g), k, solver)
            rows = whitener.unwhiten(rows)
            if normalise in ("rows", "gain"):
                rows = rows / rows.norm(dim=1, keepdim=True)
            if normalise == "gain":
                rows = default_gain_rows(rows, sums.xtx, sums.n_tokens)
            scores[m], directions[m] = values, fix_signs(rows)
    budget = avg_rank * len(order)
    available = sum(s.numel() for s in scores.values())
    if available < budget:
        raise ValueError(f"only {available} directions with a non-zero gradient for a budget of {budget} ranks "
                         "(avg_rank × modules): lower avg_rank, raise rho, or calibrate on more labelled data")
    ranks = greedy_ranks(scores, budget, order)
    return InitResult(
        method="newton", ranks=ranks, components={m: directions[m][: ranks[m]].clone() for m in order},
        scores=scores, budget=budget, decompositions=len(groups), solvers=solvers,
        settings={"avg_rank": avg_rank, "rho": rho, "damping": damping, "whitening": whitening,
                  "normalise": normalise, "solver": solver},
    )


def predicted_decrease(result: InitResult) -> dict[str, float]:
    """½ Σ_{i ≤ r_m} σ_i² per module: the quadratic model's loss decrease at the rank-r_m Newton step."""
    return {m: 0.5 * float(result.scores[m][: r].sum()) for m, r in result.ranks.items()}


def _whitener(name: str, sums: GroupSums, damping: float, whitening: str) -> Whitener:
    return Whitener(name, sums, damping, whitening)


def check_settings(avg_rank: int, rho: float = 2.0, damping: float = 0.01, whitening: str = "cholesky",
                   normalise: str = "rows") -> None:
    """Raise ValueError naming the first setting :func:`newton_init` would refuse (call it before a costly pass)."""
    if whitening not in WHITENINGS:
        raise ValueError(f"unknown whitening {whitening!r}; choose from {', '.join(WHITENINGS)}")
    if normalise not in NORMALISATIONS:
        raise ValueError(f"unknown normalise {normalise!r}; choose from {', '.join(NORMALISATIONS)}")
    check_whole_rank_budget(avg_rank, rho)
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 < damping < math.inf:
        raise ValueError(f"damping must be positive and finite (a share of the mean diagonal of H), got {damping!r}")


def _check(gradients: Mapping[str, torch.Tensor], groups: Mapping[str, GroupSums], order: Sequence[str],
           avg_rank: int, rho: float, damping: float, whitening: str, normalise: str) -> None:
    check_settings(avg_rank, rho, damping, whitening, normalise)
    missing = [m for m in order if m not in gradients]
    if missing:
        raise ValueError(f"no gradient for {len(missing)} modules (e.g. {missing[0]!r}); pass {{module: G}} for all")
    for sums in groups.values():
        d_in = sums.xtx.shape[-1]
        for m in sums.members:
            g = gradients[m]
            if not isinstance(g, torch.Tensor) or g.ndim != 2 or g.shape[1] != d_in:
                shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise ValueError(f"gradient of {m!r} has shape {shape}, expected (d_out, {d_in}) "
                                 "(nn.Linear layout; transpose Conv1D gradients)")
            if not bool(torch.isfinite(g).all()):
                raise ValueError(f"gradient of {m!r} has NaN or infinite entries")
