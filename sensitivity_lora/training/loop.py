"""TsqLoRA's state during one training run, apart from any trainer: the pool scoring, the sampler and the
dynamic ranks, driven by three calls per optimiser step. The Trainer callback and hand-written loops
(``sensitivity-lora evaluate``) both use it.

    run = TsqLoRARun(model, config, total_steps, make_batch=make_batch, n_examples=len(data))
    for step in range(total_steps):
        indices = run.batch(step, batch_size)      # drawn from softmax(Q/τ); scored every K steps
        run.before_step(step)                       # the sensitivity probe, in the window before a change
        ... forward, backward, optimizer.step(), scheduler.step(), zero_grad ...
        run.after_step(step + 1, optimizer)          # ranks move on schedule
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from torch import nn

from ..settings import check_adapter_name
from .checks import check_positive_int, check_seed
from .dynamic_ranks import DynamicRanks, RankSchedule
from .per_sample import SampleLossFn
from .quality import MakeBatch, QualityConfig, QualityTerms, score_candidates
from .sampler import QualitySampler, effective_fraction


@dataclass(frozen=True)
class TsqLoRAConfig:
    """What TsqLoRA does during training: ``quality`` (None: plain uniform sampling) and ``ranks``
    (None: the ranks stay as built). ``loss_fn(model, output, batch)`` gives one loss per row
    (default: :func:`~sensitivity_lora.training.per_sample.sample_losses`)."""

    quality: QualityConfig | None = field(default_factory=QualityConfig)
    ranks: RankSchedule | None = field(default_factory=RankSchedule)
    loss_fn: SampleLossFn | None = None
    adapter_name: str = "default"

    def __post_init__(self) -> None:
        if self.quality is not None and not isinstance(self.quality, QualityConfig):
            raise ValueError(f"quality must be a QualityConfig or None, got {type(self.quality).__name__}")
        if self.ranks is not None and not isinstance(self.ranks, RankSchedule):
            raise ValueError(f"ranks must be a RankSchedule or None, got {type(self.ranks).__name__}")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ValueError(f"loss_fn must be a callable (model, output, batch) -> losses or None, got {self.loss_fn!r}")
        check_adapter_name(self.adapter_name)  # else found only when the Trainer starts


class TsqLoRARun:
    """One run's TsqLoRA state. ``sampler`` defaults to a new :class:`QualitySampler` over ``n_examples``
    rows when the config has a quality part; ``make_batch(rows)`` builds a labelled batch on the device.

    ``refreshes`` records every scoring (step, seconds, η, pool size, mean loss) and
    ``scoring_seconds`` their total, to set the cost of scoring against the training time;
    ``dynamic.history`` records the rank changes.
    """

    def __init__(self, model: nn.Module, config: TsqLoRAConfig, total_steps: int, *,
                 make_batch: MakeBatch | None = None, n_examples: int | None = None,
                 sampler: QualitySampler | None = None, seed: int = 0) -> None:
        if not isinstance(config, TsqLoRAConfig):
            raise ValueError(f"config must be a TsqLoRAConfig, got {type(config).__name__}")
        check_positive_int("total_steps", total_steps)  # int() would take 2.5 as 2 and fail on NaN without a name
        check_seed("seed", seed)
        if make_batch is not None and not callable(make_batch):
            raise ValueError(f"make_batch must be a callable (rows) -> a labelled batch, or None, got {make_batch!r}")
        if sampler is not None and not isinstance(sampler, QualitySampler):
            raise ValueError(f"sampler must be a QualitySampler or None, got {type(sampler).__name__}")
        self.model, self.config, self.total_steps = model, config, int(total_steps)
        quality = config.quality
        if quality is not None and sampler is None:
            if n_examples is None:
                raise ValueError("quality-aware sampling needs the number of training rows (n_examples)")
            sampler = QualitySampler(n_examples, quality.temperature, quality.pool_size, quality.seed + seed,
                                     ess_fraction=quality.ess_fraction)
        if quality is not None and make_batch is None:
            raise ValueError("quality-aware sampling needs make_batch(rows) -> a labelled batch")
        self.sampler, self.make_batch = sampler, make_batch
        self.dynamic = (DynamicRanks(model, config.ranks, config.adapter_name, total_steps=self.total_steps)
                        if config.ranks is not None else None)
        self.refreshes: list[dict[str, Any]] = []
        self.scoring_seconds = 0.0
        self._draws = None

    def refresh(self, step: int) -> QualityTerms | None:
        """Score a new candidate pool and sample from softmax(Q/τ) over it from now on."""
        quality = self.config.quality
        if quality is None or self.sampler is None:
            return None
        pool = self.sampler.new_pool()
        terms = score_candidates(self.model, self.make_batch, pool, quality, self.config.loss_fn)
        self.sampler.set_scores(terms.indices, terms.score(quality.alphas))
        self.scoring_seconds += terms.seconds
        self.refreshes.append({"step": step, "seconds": terms.seconds, "step_size": terms.step_size,
                               "pool": len(pool), "mean_loss": float(terms.losses.mean()),
                               "temperature": self.sampler.last_temperature,
                               "effective_fraction": effective_fraction(self.sampler.probs)})
        return terms

    def refresh_due(self, step: int) -> bool:
        quality = self.config.quality
        return quality is not None and step % quality.refresh_every == 0 and step < self.total_steps

    def batch(self, step: int, batch_size: int) -> list[int]:
        """The rows of optimiser step ``step``: scored first if a refresh is due, then drawn from the sampler."""
        if self.sampler is None:
            raise ValueError("this run has no quality sampler (TsqLoRAConfig(quality=None)): use your own batches")
        if self.refresh_due(step):
            self.refresh(step)
        if self._draws is None:
            self._draws = iter(self._endless())
        return [next(self._draws) for _ in range(batch_size)]

    def _endless(self) -> Iterator[int]:
        while True:
            yield from self.sampler

    def before_step(self, step: int) -> None:
        if self.dynamic is not None:
            self.dynamic.step_begin(step)

    def after_step(self, steps_done: int, optimizer: Any) -> dict[str, tuple[int, int]] | None:
        return self.dynamic.step_end(steps_done, optimizer) if self.dynamic is not None else None

    def finish(self) -> None:
        if self.dynamic is not None:
            self.dynamic.probe.detach()

    def summary(self, train_seconds: float | None = None) -> dict[str, Any]:
        """JSON-ready: the scoring cost (and its share of ``train_seconds``), refreshes and rank changes."""
        out: dict[str, Any] = {"scoring_seconds": self.scoring_seconds, "refreshes": len(self.refreshes),
                               "refresh_log": self.refreshes}
        if train_seconds:
            out["scoring_fraction"] = self.scoring_seconds / train_seconds
        if self.dynamic is not None:
            out["rank_changes"] = [{"step": h["step"], "changes": {n: list(c) for n, c in h["changes"].items()}}
                                   for h in self.dynamic.history[1:]]
        return out
