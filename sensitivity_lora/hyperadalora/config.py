"""HyperAdaLoRA's settings: one frozen, validated dataclass (the shape of PEFT's ``AdaLoraConfig``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

from ..settings import check_flag


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _in_unit(name: str, value: Any, closed_low: bool = False) -> None:
    ok = isinstance(value, Real) and not isinstance(value, bool) and (0 <= value < 1 if closed_low else 0 < value < 1)
    if not ok:
        raise ValueError(f"{name} must lie in {'[0, 1)' if closed_low else '(0, 1)'}, got {value!r}")


def _finite(value: Any) -> bool:
    """A real, finite number; not a bool (True would pass as 1)."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class HyperAdaLoraConfig:
    """What HyperAdaLoRA builds and how it prunes.

    Budget: every target starts with ``init_rank`` triplets (default ⌈1.5 r̄⌉, as the
    ``adalora`` method here) and pruning leaves exactly ``avg_rank × #targets`` of them.
    Schedule (AdaLoRA's): no pruning for ``tinit`` steps, a cubic decrease of the budget
    until ``total_steps − tfinal`` (masks recomputed every ``delta_t`` steps), then the
    final mask fixed. Hypernetwork: ``hidden_size`` (width h of its attention layers),
    ``num_layers`` and ``num_heads`` of them, ``chunk_size`` (rows of P / columns of Q
    one token generates), ``code_size`` (the learned per-token code of each module).
    """

    avg_rank: int
    total_steps: int
    init_rank: int | None = None
    lora_alpha: float | None = None  # None: 2 · avg_rank, as the other methods here
    lora_dropout: float = 0.0
    tinit: int | None = None  # None: AdaLoRA's phases scaled to the run (methods.adalora_schedule's rule)
    tfinal: int | None = None
    delta_t: int | None = None
    beta1: float = 0.85  # EMA of the sensitivity |t · ∂L/∂t| (PEFT's default)
    beta2: float = 0.85  # EMA of its uncertainty
    orth_reg_weight: float = 0.5  # PEFT AdaLoRA's default
    hidden_size: int = 64
    num_layers: int = 1
    num_heads: int = 4
    chunk_size: int = 32
    code_size: int = 16
    weight_stats: bool = True  # feed per-chunk statistics of the frozen weight to the tokens
    init_std: float = 0.02  # std of the generated P and Q at the start (AdaLoRA's init of A and B)
    target_modules: Any = field(default=None)  # as resolve_targets takes them; None: every linear in the blocks

    def __post_init__(self) -> None:
        _positive_int("avg_rank", self.avg_rank)
        _positive_int("total_steps", self.total_steps)
        if self.init_rank is None:
            object.__setattr__(self, "init_rank", math.ceil(1.5 * self.avg_rank))
        _positive_int("init_rank", self.init_rank)
        if self.init_rank < self.avg_rank:
            raise ValueError(f"init_rank ({self.init_rank}) must be at least avg_rank ({self.avg_rank}): "
                             "pruning only removes triplets")
        if self.lora_alpha is not None and (isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, Real)
                                            or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0):
            raise ValueError(f"lora_alpha must be a positive finite number (or None for 2 · avg_rank), "
                             f"got {self.lora_alpha!r}")
        _in_unit("lora_dropout", self.lora_dropout, closed_low=True)
        _in_unit("beta1", self.beta1)
        _in_unit("beta2", self.beta2)
        if not (_finite(self.orth_reg_weight) and self.orth_reg_weight >= 0):
            raise ValueError(f"orth_reg_weight must be a finite number ≥ 0, got {self.orth_reg_weight!r}")
        for name in ("hidden_size", "num_layers", "num_heads", "chunk_size", "code_size"):
            _positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        if not (_finite(self.init_std) and self.init_std > 0):
            raise ValueError(f"init_std must be a positive finite number, got {self.init_std!r}")
        check_flag("weight_stats", self.weight_stats)
        self._fill_schedule()

    def _fill_schedule(self) -> None:
        total = self.total_steps
        defaults = {"tinit": max(1, total // 10), "tfinal": max(1, total // 5)}
        for name, default in defaults.items():
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, default)
            elif isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.tinit >= total - self.tfinal:
            raise ValueError(f"the schedule leaves no steps to prune in: tinit={self.tinit}, tfinal={self.tfinal}, "
                             f"total_steps={total} (need tinit < total_steps − tfinal; train longer or shorten them)")
        if self.delta_t is None:
            object.__setattr__(self, "delta_t", max(1, (total - self.tinit - self.tfinal) // 10))
        _positive_int("delta_t", self.delta_t)

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.avg_rank

    @property
    def scale(self) -> float:
        """The update's factor, AdaLoRA's: ΔW = P diag(Λ) Q · alpha / init_rank."""
        return self.alpha / self.init_rank
