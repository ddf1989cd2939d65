"""How statistics become ranks: one frozen, validated settings object (docs/method.md §3–§5).

    settings = AllocationSettings(method="sra", rho=4.0)          # validated on construction
    settings.replace(fusion="global")                               # a validated copy

Every entry point (``compute_allocation``, ``get_peft_model``, the CLI, streaming,
distributed runs, the evaluation harness) takes one of these, or its fields as
keyword arguments. The average rank r̄ is not part of it: it is the budget,
given next to the settings.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Mapping

HESSIAN_MODES = ("diag", "full")
SCOPES = ("matrix", "row", "eigen")
FUSIONS = ("sigma_mu2", "global", "local", "equal")
METHODS = ("sra", "pra", "uniform")
BUDGET_MODES = ("rank", "params")
INITS = ("none", "covariance", "eva", "output-aware")
# how long A's rows are: unit (EVA's orthonormal rows) or the input gain of PEFT's default A (docs/method.md §7)
INIT_SCALES = ("unit", "default-gain")
AUTO_INIT = "auto"  # the command's and SensitivityConfig's default: resolved by auto_init once the model is known
AUTO_INIT_SCALE = "default-gain"  # the row length init="auto" gives its covariance start


def auto_init(causal_lm: bool) -> str:
    """What ``init="auto"`` means (docs/results.md, "Defaults"): ``covariance`` for a causal LM, with A's rows at
    the input gain of PEFT's default A (``AUTO_INIT_SCALE``; see :func:`auto_init_scale`), ``none`` for other
    models, where a covariance start lost 1.8 ± 1.0 accuracy points at r̄ = 4 on MiniLM/BBC classification
    (3 seeds), as PEFT's EVA initialisation did."""
    return "covariance" if causal_lm else "none"


def auto_init_scale(init: str) -> str:
    """The row length that goes with an init chosen by ``auto``: ``default-gain`` for the covariance start.
    Unit rows move the adapter's output 14-18× as far per step as PEFT's default A (massive activations), which
    cost 3.6 held-out perplexity on Gemma 3 270M at lr 1e-3 against 0.7 with matched rows; on SmolLM2 the two
    are within 0.2 of each other and of uniform LoRA at each one's tuned rate (docs/results.md)."""
    return AUTO_INIT_SCALE if init != "none" else "unit"


# the rule that chose an allocation's ranks: a method, or an init that brings its own rank rule
RANK_RULES = METHODS + ("eva", "output-aware")


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is unknown; choose one of {', '.join(choices)}")


def check_avg_rank(avg_rank: Any) -> None:
    """r̄ must be a positive finite number."""
    if not _is_real(avg_rank) or not (math.isfinite(avg_rank) and avg_rank > 0):
        raise ValueError(f"avg_rank must be a positive finite number, got {avg_rank!r}")


def check_rho(rho: Any, name: str = "rho") -> None:
    """The rank cap factor ρ (r_max = ⌊ρ·r̄⌋): a positive number, ``math.inf`` for no cap. One rule for every
    door that takes it (the allocation settings, TsqLoRA's initial ranks)."""
    if not _is_real(rho) or math.isnan(rho) or rho <= 0:
        raise ValueError(f"{name} must be a positive number (or inf for no cap), got {rho!r}")


def check_hessian(hessian: Any) -> None:
    """What the calibration accumulates: ``diag`` or ``full`` (checked by every door before its pass)."""
    if not isinstance(hessian, str) or hessian not in HESSIAN_MODES:
        raise ValueError(f"hessian must be one of {', '.join(HESSIAN_MODES)}, got {hessian!r}")


def check_flag(name: str, value: Any) -> None:
    """A switch is True or False: a truthy string such as "no" must not silently turn it on."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_adapter_name(adapter_name: Any) -> None:
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")


@dataclass(frozen=True)
class AllocationSettings:
    """Scoring and allocation settings; the defaults are the method's.

    method: ``sra`` (ranks ∝ θ), ``pra`` (tiers) or ``uniform``.
    hessian: ``diag`` (Σx², all the default metrics need) or ``full`` (Σxxᵀ too).
    scope: ``matrix`` (diag(H_row) repeated d_out times), ``row`` or ``eigen`` (needs ``full``).
    topk: a float in (0, 1] is a fraction of the m diagonal entries (k = floor(topk · m), at
      least 1); an int ≥ 1 an absolute k.
    energy: the energy share α of the effective rank, in (0, 1].
    fusion: ``sigma_mu2`` (the method's σ/μ² weights) or the ablations ``global``, ``local``, ``equal``.
    r_min: the smallest rank a module gets (≥ 1).
    rho: the rank cap r_max = min(d_in, d_out, ρ·r̄); ``math.inf`` for none.
    r_max: an absolute cap that overrides ρ.
    budget_mode: ``rank`` (Σ r = r̄·M) or ``params`` (Σ r·(d_in + d_out) matched; SRA only).
    tiers: PRA's number of tiers.
    init: how the adapters start (docs/method.md §7). ``none``: PEFT's default LoRA init with the
      ranks of ``method``; ``covariance``: the ranks of ``method``, A = the top eigenvectors of each
      module's input covariance, B = 0; ``eva``: PEFT EVA's ranks and A, computed exactly;
      ``output-aware``: ranks and A from the spectrum of W·M. Any init other than ``none`` needs
      Σxxᵀ and so implies ``hessian="full"``.
    init_rho: the per-module rank cap round(init_rho · r̄) of the ``eva`` and ``output-aware`` rules
      (EVA's ρ; PEFT's default 2).
    init_scale: the length of A's rows. ``unit``: unit rows (EVA's); ``default-gain``: each row scaled so
      that E[(a·x)²] over the calibration inputs equals a row of PEFT's default A, tr(M)/(3d), so the
      adapter's output moves per step as plain LoRA's does (only the directions change). Unused with
      ``init="none"`` (PEFT's own A keeps its own scale), as ``init_rho`` is unused by ``covariance``.
    """

    method: str = "sra"
    hessian: str = "diag"
    scope: str = "matrix"
    topk: float | int = 0.5
    energy: float = 0.85
    fusion: str = "sigma_mu2"
    r_min: int = 1
    rho: float = 4.0
    r_max: int | None = None
    budget_mode: str = "rank"
    tiers: int = 3
    init: str = "none"
    init_rho: float = 2.0
    init_scale: str = "unit"

    def __post_init__(self) -> None:
        _choice("init", self.init, INITS)
        if self.init != "none" and self.hessian != "full":
            object.__setattr__(self, "hessian", "full")  # an initialisation reads Σxxᵀ
        _choice("init_scale", self.init_scale, INIT_SCALES)
        _choice("method", self.method, METHODS)
        _choice("hessian", self.hessian, HESSIAN_MODES)
        _choice("scope", self.scope, SCOPES)
        _choice("fusion", self.fusion, FUSIONS)
        _choice("budget_mode", self.budget_mode, BUDGET_MODES)
        topk = self.topk
        if not _is_real(topk):
            raise ValueError(f"topk={topk!r} must be a float in (0, 1] (a fraction of the entries) "
                             "or an int >= 1 (an absolute count)")
        if _is_int(topk):
            if topk < 1:
                raise ValueError(f"topk={topk} as an int is an absolute count and must be >= 1; "
                                 "use a float in (0, 1] for a fraction")
        elif not (math.isfinite(topk) and 0.0 < topk <= 1.0):
            raise ValueError(f"topk={topk} as a float is a fraction and must lie in (0, 1]; "
                             "pass an int for an absolute count")
        if not _is_real(self.energy) or not (math.isfinite(self.energy) and 0.0 < self.energy <= 1.0):
            raise ValueError(f"energy={self.energy!r} must lie in (0, 1] (the energy share of the effective rank)")
        if not _is_int(self.r_min) or self.r_min < 1:
            raise ValueError(f"r_min must be an int >= 1, got {self.r_min!r}")
        check_rho(self.rho)
        if self.r_max is not None and (not _is_int(self.r_max) or self.r_max < 1):
            raise ValueError(f"r_max must be an int >= 1 or None, got {self.r_max!r}")
        if not _is_int(self.tiers) or self.tiers < 1:
            raise ValueError(f"tiers must be an int >= 1, got {self.tiers!r}")
        if not _is_real(self.init_rho) or not (math.isfinite(self.init_rho) and self.init_rho >= 1.0):
            raise ValueError(f"init_rho must be a finite number >= 1 (the cap is round(init_rho · r̄)), "
                             f"got {self.init_rho!r}")
        if self.budget_mode == "params" and self.method != "sra":
            raise ValueError(f"budget_mode='params' applies to method 'sra' only, not {self.method!r}")
        if self.scope == "eigen" and self.hessian != "full":
            raise ValueError("scope='eigen' needs the full Hessian: use hessian='full'")

    def replace(self, **changes: Any) -> "AllocationSettings":
        """A validated copy with ``changes`` applied (unknown names raise TypeError listing the fields)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown allocation setting(s) {', '.join(unknown)}; the settings are "
                            f"{', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AllocationSettings":
        """The settings recorded in an allocation (other keys, e.g. the model name, are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if values.get("rho") in ("inf", "Infinity"):
            values["rho"] = math.inf
        return cls(**values)

    def k_for(self, m: int) -> int:
        """The number of top entries averaged for a module with m diagonal entries."""
        from fractions import Fraction

        if _is_int(self.topk):
            if self.topk > m:
                raise ValueError(f"topk={self.topk} exceeds the m={m} diagonal entries of a module; "
                                 "lower topk or give it as a fraction in (0, 1]")
            return int(self.topk)
        # The decimal the user wrote (0.29, not 0.28999…), so floor(0.29 · 100) is 29.
        return max(1, math.floor(Fraction(str(float(self.topk))) * m))


def resolve_settings(settings: AllocationSettings | None = None, **overrides: Any) -> AllocationSettings:
    """``settings`` (default: the method's) with keyword overrides applied and validated."""
    if settings is not None and not isinstance(settings, AllocationSettings):
        raise TypeError(f"settings must be an AllocationSettings, got {type(settings).__name__}")
    base = settings or AllocationSettings()
    return base.replace(**overrides) if overrides else base
