"""TsqLoRA's dynamic ranks: at scheduled steps, rank moves from the LoRA modules that have become least
sensitive to the most sensitive ones, with the total rank exact after every change.

Sensitivity during training is S_w = mean |W ⊙ ∇_W ℓ| of the effective weight W = W₀ + s·BA,
averaged over the ``window`` training steps before each change (the probe hooks the real
training passes; no extra data, no stored weight gradients). The target ranks are the package's
SRA rule on S (r ∝ S in [r_min, ⌊ρ·r̄⌋], Σ r = the budget), and each change moves at most
``max_moves`` rank units towards the target, one unit at a time from the module furthest above
its target to the one furthest below, so Σ r never changes. A shrinking module drops the
directions with the least first-order effect on the loss (:mod:`.sensitivity`); a growing one
gets fresh directions with B = 0 (:mod:`.resize`). No change happens in the last ``1 − stop``
of training, so the final ranks are trained for a while. The PEFT config is rewritten after every
change (full-path, regex-escaped ``rank_pattern``/``alpha_pattern``), so ``save_pretrained``
writes a plain LoRA adapter that ``PeftModel.from_pretrained`` loads without this package.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checks import check_positive_int, check_seed
from .resize import check_resizable, prepare_resize
from .sensitivity import SensitivityProbe, rank_cap, ranks_from_scores

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankSchedule:
    """When and how far ranks move.

    every: optimiser steps between two changes; start: the first change (default ``every``);
    stop: no change after this step (an int), or after this fraction of the total steps (a float
    in (0, 1], default 0.8); window: training steps whose sensitivity decides a change;
    max_moves: rank units moved per change (default ⌈budget / 10⌉); rho, r_min: the bounds
    r_min ≤ r ≤ ⌊ρ·r̄⌋; seed: the fresh directions' initialisation.
    """

    every: int = 100
    start: int | None = None
    stop: float | int = 0.8
    window: int = 10
    max_moves: int | None = None
    rho: float = 4.0
    r_min: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int("every", self.every)
        check_positive_int("start", self.start, allow_none=True)
        check_positive_int("window", self.window)
        check_positive_int("max_moves", self.max_moves, allow_none=True)
        check_positive_int("r_min", self.r_min)
        if isinstance(self.stop, bool) or not isinstance(self.stop, (int, float)) or not self.stop > 0 \
                or (isinstance(self.stop, float) and self.stop > 1):  # `not > 0` refuses NaN too
            raise ValueError(f"stop must be a step (int ≥ 1) or a fraction of training in (0, 1], got {self.stop!r}")
        if isinstance(self.rho, bool) or not (isinstance(self.rho, (int, float)) and self.rho >= 1):
            raise ValueError(f"rho must be a number ≥ 1 (inf for no cap), got {self.rho!r}")
        check_seed("seed", self.seed)

    def steps(self, total_steps: int | None) -> list[int]:
        """The steps (counts of finished optimiser steps) after which ranks change."""
        if isinstance(self.stop, float):
            if total_steps is None or total_steps < 1:
                raise ValueError("a fractional stop needs the total number of training steps")
            last = math.floor(self.stop * total_steps)
        else:
            last = self.stop
        if total_steps is not None and total_steps > 0:
            last = min(last, total_steps - 1)
        first = self.start if self.start is not None else self.every
        return list(range(first, last + 1, self.every))


def move_towards(current: dict[str, int], target: dict[str, int], max_moves: int) -> dict[str, int]:
    """At most ``max_moves`` single rank units from the module furthest above its target to the one
    furthest below (ties by module order); Σ is unchanged."""
    new = dict(current)
    for _ in range(max_moves):
        donor = max(new, key=lambda n: new[n] - target[n])
        taker = max(new, key=lambda n: target[n] - new[n])
        if new[donor] <= target[donor] or new[taker] >= target[taker]:
            break
        new[donor] -= 1
        new[taker] += 1
    return new


class DynamicRanks:
    """The rank controller of one PEFT model's adapter. Call :meth:`step_begin` before each optimiser
    step and :meth:`step_end` after it (the Trainer callback does), or :meth:`reallocate` directly."""

    def __init__(self, peft_model: nn.Module, schedule: RankSchedule | None = None, adapter_name: str = "default",
                 total_steps: int | None = None) -> None:
        from peft.tuners.lora import LoraLayer

        if schedule is not None and not isinstance(schedule, RankSchedule):
            raise ValueError(f"schedule must be a RankSchedule or None, got {type(schedule).__name__}")
        check_positive_int("total_steps", total_steps, allow_none=True)
        if not hasattr(peft_model, "peft_config") or adapter_name not in peft_model.peft_config:
            raise ValueError(f"expected a PeftModel with a LoRA adapter {adapter_name!r}")
        self.model = peft_model
        self.schedule = schedule or RankSchedule()
        self.adapter_name = adapter_name
        base = peft_model.get_base_model()
        self.layers: dict[str, nn.Module] = {}
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.r:
                check_resizable(module, adapter_name)
                self.layers[name] = module
        if not self.layers:
            raise ValueError(f"the model has no LoRA layer of adapter {adapter_name!r}")
        self.dims = {n: (m.lora_A[adapter_name].in_features, m.lora_B[adapter_name].out_features)
                     for n, m in self.layers.items()}
        self.budget = sum(self.ranks().values())
        self.avg_rank = self.budget / len(self.layers)
        if self.budget < self.schedule.r_min * len(self.layers):
            raise ValueError(f"the rank budget {self.budget} is below r_min = {self.schedule.r_min} per module")
        caps = sum(rank_cap(d, self.avg_rank, self.schedule.rho) for d in self.dims.values())
        if self.budget > caps:  # found now, not at the first change after the compute is spent
            raise ValueError(f"the rank budget {self.budget} does not fit under the caps min(d_in, d_out, "
                             f"⌊ρ·r̄⌋) of the {len(self.layers)} modules (Σ = {caps}): raise rho")
        self.max_moves = self.schedule.max_moves or max(1, math.ceil(self.budget / 10))
        self.probe = SensitivityProbe(self.layers, adapter_name, training_only=True)
        self.generator = torch.Generator().manual_seed(self.schedule.seed)
        self.change_steps: list[int] = []
        self.history: list[dict[str, Any]] = [{"step": 0, "ranks": self.ranks()}]
        if total_steps is not None or not isinstance(self.schedule.stop, float):
            self.set_total_steps(total_steps)  # a fractional stop waits for the Trainer's step count
        self.write_config()

    def set_total_steps(self, total_steps: int | None) -> None:
        self.change_steps = self.schedule.steps(total_steps)

    def ranks(self) -> dict[str, int]:
        return {n: int(m.r[self.adapter_name]) for n, m in self.layers.items()}

    def step_begin(self, step: int) -> None:
        """Before optimiser step ``step`` (0-based): measure sensitivity if a change is due within the window."""
        if any(t - self.schedule.window <= step < t for t in self.change_steps):
            self.probe.attach()
        else:
            self.probe.detach()

    def step_end(self, steps_done: int, optimizer: Any) -> dict[str, tuple[int, int]] | None:
        """After ``steps_done`` optimiser steps: change ranks if scheduled; returns the changes."""
        if steps_done in self.change_steps:
            return self.reallocate(optimizer, steps_done)
        return None

    def reallocate(self, optimizer: Any, step: int | None = None) -> dict[str, tuple[int, int]]:
        """Move rank towards r ∝ S (at most ``max_moves`` units); {module: (old rank, new rank)} of the changes."""
        self.probe.detach()
        scores = self.probe.scores()
        if not any(self.probe.calls.values()):
            log.warning("no training pass was measured before this rank change (step %s): ranks kept", step)
            return {}
        current = self.ranks()
        target = ranks_from_scores(scores, self.dims, self.avg_rank, self.schedule.rho, self.schedule.r_min,
                                   budget=self.budget)
        new = move_towards(current, target, self.max_moves)
        changes = {n: (current[n], new[n]) for n in new if new[n] != current[n]}
        commits = []  # every layer prepared before any changes: an error leaves the model and the optimiser as they were
        for name, (old, rank) in changes.items():
            keep = torch.arange(old)
            if rank < old:  # drop the directions whose removal changes the loss least, to first order
                importance = self.probe.direction_scores(name)
                if importance is not None and importance.numel() == old:
                    keep = importance.argsort(descending=True, stable=True)[:rank].sort().values
                else:
                    keep = keep[:rank]
            commits.append(prepare_resize(self.layers[name], self.adapter_name, keep, rank, optimizer, self.generator))
        for commit in commits:
            commit()
        if sum(self.ranks().values()) != self.budget:  # pragma: no cover - move_towards keeps the sum
            raise RuntimeError(f"rank budget broken: {sum(self.ranks().values())} != {self.budget}")
        self.probe.reset()
        self.write_config()
        self.history.append({"step": step, "ranks": self.ranks(), "changes": changes,
                             "sensitivity": scores})
        return changes

    def write_config(self) -> None:
        """The adapter's LoraConfig, rewritten to the current ranks (what ``save_pretrained`` saves)."""
        config = self.model.peft_config[self.adapter_name]
        config.rank_pattern = {re.escape(n): int(m.r[self.adapter_name]) for n, m in self.layers.items()}
        config.alpha_pattern = {re.escape(n): float(m.lora_alpha[self.adapter_name]) for n, m in self.layers.items()}
