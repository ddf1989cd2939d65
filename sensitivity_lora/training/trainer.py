"""TsqLoRA in the Hugging Face ``Trainer`` (and trainers built on it, e.g. TRL's): one line,

    trainer = TsqLoRATrainer(model=peft_model, args=args, train_dataset=data, tsqlora=TsqLoRAConfig())

or ``tsqlora_trainer(SFTTrainer)(..., tsqlora=...)`` for another Trainer class. The subclass gives
the Trainer the quality sampler and adds :class:`TsqLoRACallback`, which scores a candidate
pool every K optimiser steps and drives the dynamic ranks. The callback alone (without the
sampler) runs the dynamic ranks in an unmodified Trainer: ``callbacks=[TsqLoRACallback(...)]``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from transformers import Trainer, TrainerCallback

from .dynamic_ranks import DynamicRanks, RankSchedule
from .per_sample import SampleLossFn
from .quality import MakeBatch, QualityConfig, score_candidates
from .sampler import QualitySampler

log = logging.getLogger(__name__)


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


class TsqLoRACallback(TrainerCallback):
    """Scores the pool every K steps (if a sampler is bound) and changes ranks on schedule.

    ``history`` records every refresh (step, seconds, η) and ``scoring_seconds`` their total, so the
    cost of scoring can be set against the training time; ``dynamic.history`` the rank changes.
    """

    def __init__(self, config: TsqLoRAConfig | None = None) -> None:
        self.config = config or TsqLoRAConfig()
        self.sampler: QualitySampler | None = None
        self.make_batch: MakeBatch | None = None
        self.dynamic: DynamicRanks | None = None
        self.history: list[dict[str, Any]] = []
        self.scoring_seconds = 0.0

    def bind(self, sampler: QualitySampler, make_batch: MakeBatch) -> None:
        """The sampler to refresh and how to build a labelled batch on the device from dataset rows."""
        self.sampler, self.make_batch = sampler, make_batch

    def refresh(self, model: Any, step: int) -> None:
        """Score a new candidate pool and hand softmax(Q/τ) to the sampler."""
        quality = self.config.quality
        if quality is None or self.sampler is None or self.make_batch is None:
            return
        pool = self.sampler.new_pool()
        terms = score_candidates(model, self.make_batch, pool, quality, self.config.loss_fn)
        self.sampler.set_scores(terms.indices, terms.score(quality.alphas))
        self.scoring_seconds += terms.seconds
        self.history.append({"step": step, "seconds": terms.seconds, "step_size": terms.step_size,
                             "pool": len(pool), "mean_loss": float(terms.losses.mean())})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.config.ranks is not None and self.dynamic is None:
            self.dynamic = DynamicRanks(model, self.config.ranks, self.config.adapter_name, total_steps=state.max_steps)
        self.refresh(model, state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.dynamic is not None:
            self.dynamic.step_begin(state.global_step)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.dynamic is not None:
            changes = self.dynamic.step_end(state.global_step, optimizer)
            if changes:
                log.info("step %d: ranks changed in %d modules", state.global_step, len(changes))
        quality = self.config.quality
        if quality is not None and state.global_step % quality.refresh_every == 0 \
                and state.global_step < state.max_steps:
            self.refresh(model, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.dynamic is not None:
            self.dynamic.probe.detach()


class TsqLoRAMixin:
    """Put before a Trainer class: the quality sampler for training and the TsqLoRA callback."""

    def __init__(self, *args: Any, tsqlora: TsqLoRAConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tsqlora = TsqLoRACallback(tsqlora)
        self.add_callback(self.tsqlora)

    def _get_train_sampler(self, train_dataset: Any = None):
        quality = self.tsqlora.config.quality
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if quality is None or dataset is None or not hasattr(dataset, "__len__"):
            if quality is not None:
                raise ValueError("quality-aware sampling needs a training dataset with a length (not an "
                                 "IterableDataset); set TsqLoRAConfig(quality=None) to keep only the dynamic ranks")
            return super()._get_train_sampler(train_dataset)
        sampler = QualitySampler(len(dataset), quality.temperature, quality.pool_size, quality.seed + self.args.seed)
        collate = self._scoring_collator(dataset)

        def make_batch(rows: Sequence[int]):
            return self._prepare_inputs(collate([dataset[i] for i in rows]))

        self.tsqlora.bind(sampler, make_batch)
        return sampler

    def _scoring_collator(self, dataset: Any):
        """The collator the training loader uses for ``dataset`` (columns already removed for a datasets.Dataset)."""
        try:
            import datasets

            if isinstance(dataset, datasets.Dataset):
                return self.data_collator
        except ImportError:  # pragma: no cover - datasets is a transformers dependency in practice
            pass
        return self._get_collator_with_removed_columns(self.data_collator, description="training")


def tsqlora_trainer(trainer_class: type = Trainer) -> type:
    """``trainer_class`` with TsqLoRA: its constructor takes ``tsqlora=TsqLoRAConfig(...)``."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise ValueError(f"expected a transformers.Trainer subclass, got {trainer_class!r}")
    return type(f"TsqLoRA{trainer_class.__name__}", (TsqLoRAMixin, trainer_class), {})


TsqLoRATrainer = tsqlora_trainer(Trainer)


def scoring_fraction(callback: TsqLoRACallback, train_seconds: float) -> float:
    """The share of training time spent scoring the pools."""
    return callback.scoring_seconds / train_seconds if train_seconds > 0 else float("nan")
