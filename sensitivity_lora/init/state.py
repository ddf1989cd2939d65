"""The inputs and the result shared by every initialiser, and their conversion to PEFT's formats.

Inputs: one :class:`GroupSums` per input group (the raw sums of one calibration pass, shared by
the modules that read the same input). Plain tuples ``(xtx, total, n_tokens, members)`` are
accepted too; :func:`group_sums_from_statistics` reads them off a ``CalibrationStatistics``
(duck-typed: ``.groups[name].raw_xtx()``, ``.sum``, ``.n_tokens``, ``.members``).

Result: :class:`InitResult`, LoRA's A matrices (B = 0) and the ranks for every target module.
:func:`to_eva_state_dict` writes it in the format of PEFT's ``get_eva_state_dict`` so that
``peft.tuners.lora.eva.initialize_lora_eva_weights(peft_model, eva_state_dict=...)`` applies it
unchanged, whatever initialiser produced it (that loader only copies A, zeroes B through
``init_lora_weights="eva"``, resizes ranks and drops rank-0 adapters).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

# PEFT's loader looks the state dict up by the PeftModel's module names: "base_model.model." + base name
PEFT_MODEL_PREFIX = "base_model.model."


class GroupSums(NamedTuple):
    """Raw sums of one input group over its calibration tokens (padding excluded)."""

    xtx: torch.Tensor  # S = Σ x xᵀ, (d_in, d_in)
    total: torch.Tensor | None  # s = Σ x, (d_in,); None where only uncentred statistics are used
    n_tokens: int  # n
    members: tuple[str, ...]  # the target modules reading this input, in model order


@dataclass
class InitResult:
    """LoRA initialisation for every target module: ``ranks`` (0 = no adapter) and A = ``components``.

    ``components[m]`` is a (ranks[m], d_in) fp64 tensor whose rows are unit-norm directions in the
    module's input space (B = 0, so the adapter starts as the identity). ``scores[m]`` are the
    per-direction scores the ranks were chosen from (for EVA: explained-variance ratios), up to the
    module's cap. ``decompositions`` counts the eigendecompositions done; ``solvers`` says which
    solver each took.
    """

    method: str
    ranks: dict[str, int]
    components: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    budget: int
    decompositions: int
    solvers: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def alpha_pattern(self, r: int, lora_alpha: float, rank_pattern: Mapping[str, int] | None = None
                      ) -> dict[str, float]:
        """See :func:`alpha_pattern`."""
        return alpha_pattern(self.ranks, r, lora_alpha, rank_pattern)


def as_group_sums(groups: Mapping[str, GroupSums | Sequence[Any]]) -> dict[str, GroupSums]:
    """Validate ``{group: (xtx, total, n_tokens, members)}`` and return it as GroupSums."""
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError("expected a non-empty mapping {group name: (xtx, total, n_tokens, members)}")
    out: dict[str, GroupSums] = {}
    seen: dict[str, str] = {}
    for name, value in groups.items():
        if not isinstance(value, GroupSums):
            if not isinstance(value, Sequence) or len(value) != 4:
                raise ValueError(f"group {name!r}: expected (xtx, total, n_tokens, members), got {type(value).__name__}")
            value = GroupSums(*value)
        members = (value.members,) if isinstance(value.members, str) else tuple(value.members)
        if not members:
            raise ValueError(f"group {name!r} has no member modules")
        for member in members:
            if member in seen:
                raise ValueError(f"module {member!r} is in two input groups ({seen[member]!r}, {name!r})")
            seen[member] = name
        out[name] = value._replace(members=members)
    return out


def group_sums_from_statistics(statistics: Any) -> dict[str, GroupSums]:
    """GroupSums of a ``CalibrationStatistics`` (needs full mode, i.e. ``calibrate(..., hessian="full")``)."""
    groups = getattr(statistics, "groups", None)
    if not isinstance(groups, Mapping):
        raise ValueError("expected calibration statistics with a .groups mapping (from sensitivity_lora.calibrate)")
    out = {}
    for name, group in groups.items():
        xtx = group.raw_xtx() if getattr(group, "xtx", True) is not None else None
        if xtx is None:
            raise ValueError(f"group {name!r} has no Σxxᵀ: calibrate with hessian='full'")
        out[name] = GroupSums(xtx, getattr(group, "sum", None), int(group.n_tokens), tuple(group.members))
    return out


def module_order(groups: Mapping[str, GroupSums], order: Sequence[str] | None = None) -> list[str]:
    """All member modules, in ``order`` when given (it must list each exactly once), else group by group."""
    members = [m for g in groups.values() for m in g.members]
    if order is None:
        return members
    order = list(order)
    if sorted(order) != sorted(members):
        missing = sorted(set(members) - set(order))[:3]
        extra = sorted(set(order) - set(members))[:3]
        raise ValueError(f"the module order must list every group member once (missing {missing}, unknown {extra})")
    return order


def alpha_pattern(ranks: Mapping[str, int], r: int, lora_alpha: float,
                  rank_pattern: Mapping[str, int] | None = None) -> dict[str, float]:
    """PEFT EVA's ``adjust_scaling_factors``: α_m = lora_alpha · r_m / r_m⁰ where r_m differs from r_m⁰.

    r_m⁰ is the module's configured rank (``rank_pattern`` by exact name, else ``r``), so α/r, the
    LoRA scale, stays lora_alpha/r⁰ after the ranks move. Rank-0 modules have no adapter and no entry.
    """
    rank_pattern = rank_pattern or {}
    out = {}
    for name, rank in ranks.items():
        base = rank_pattern.get(name, r)
        if rank > 0 and rank != base:
            out[name] = lora_alpha * rank / base
    return out


def to_eva_state_dict(result: InitResult, prefix: str = PEFT_MODEL_PREFIX, dtype: torch.dtype = torch.float64,
                      device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """``{prefix + module: A}`` in PEFT ``get_eva_state_dict``'s format, for ``initialize_lora_eva_weights``.

    Every target module gets an entry of shape (rank, d_in), rank-0 modules an empty (0, d_in)
    tensor (PEFT then replaces that LoRA layer by its base layer). PEFT's own function returns fp64
    (its IncrementalPCA promotes to fp64 from the second batch on, and it always fits at least two)
    on the model's device, keyed by the names of the model it ran on; its loader copies into the
    LoRA weight's dtype and matches the
    *PeftModel's* names, hence the default ``prefix`` "base_model.model." (use "" for a dict keyed
    like the base model). PEFT's loader pops entries from the dict it is given: pass a copy to reuse it.
    """
    return {prefix + name: a.to(device=device, dtype=dtype, copy=True).contiguous() for name, a in result.components.items()}
