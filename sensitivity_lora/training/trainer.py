"""TsqLoRA in the Hugging Face ``Trainer`` (and trainers built on it, e.g. TRL's): one line,

    trainer = TsqLoRATrainer(model=peft_model, args=args, train_dataset=data, tsqlora=TsqLoRAConfig())

or ``tsqlora_trainer(SFTTrainer)(..., tsqlora=...)`` for another Trainer class. The subclass gives
the Trainer the quality sampler and adds :class:`TsqLoRACallback`, which scores a candidate
pool every K optimiser steps and drives the dynamic ranks (:class:`~.loop.TsqLoRARun` does
the work). The callback alone runs the dynamic ranks in an unmodified Trainer:
``callbacks=[TsqLoRACallback(TsqLoRAConfig(quality=None))]``.

A refresh after step t changes the batches drawn from then on; the loader may already hold one
prefetched batch (accelerate looks one batch ahead; more with ``dataloader_num_workers`` > 0).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from transformers import Trainer, TrainerCallback

from .loop import TsqLoRAConfig, TsqLoRARun
from .quality import MakeBatch
from .resize import inner_optimizer
from .sampler import QualitySampler

log = logging.getLogger(__name__)


class TsqLoRACallback(TrainerCallback):
    """TsqLoRA's events in a Trainer run; ``run`` is the run's :class:`~.loop.TsqLoRARun` once training starts."""

    def __init__(self, config: TsqLoRAConfig | None = None) -> None:
        self.config = TsqLoRAConfig() if config is None else config  # `or` would take 0 or "" for the default
        if not isinstance(self.config, TsqLoRAConfig):
            raise ValueError(f"config must be a TsqLoRAConfig (or None), got {type(self.config).__name__}")
        self.sampler: QualitySampler | None = None
        self.make_batch: MakeBatch | None = None
        self.run: TsqLoRARun | None = None

    def bind(self, sampler: QualitySampler, make_batch: MakeBatch) -> None:
        """The sampler to refresh and how to build a labelled batch on the device from dataset rows."""
        self.sampler, self.make_batch = sampler, make_batch

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.world_size > 1:  # each process would measure its own sensitivity and resize differently
            raise ValueError(f"TsqLoRA runs in one process (got world_size={args.world_size}): rank changes and "
                             "pool scores are not synchronised across processes yet")
        if getattr(args, "n_gpu", 1) > 1:  # DataParallel: its replicas' threads would all write to one probe
            raise ValueError(f"TsqLoRA runs on one device (got n_gpu={args.n_gpu}, i.e. DataParallel): set "
                             "CUDA_VISIBLE_DEVICES to one GPU")
        if state.global_step > 0:
            log.warning("TsqLoRA: resumed at step %d; the sampler's pool and draws and the rank probe are not in the "
                        "checkpoint, so the run rescores now and its rows differ from an uninterrupted run's "
                        "(build the model from the checkpoint's adapter_config.json if ranks had changed)",
                        state.global_step)
        config = self.config
        if self.sampler is None and config.quality is not None:
            log.warning("TsqLoRA: no quality sampler is bound (use TsqLoRATrainer or tsqlora_trainer(cls)); "
                        "sampling stays the Trainer's own")
            config = TsqLoRAConfig(None, config.ranks, config.loss_fn, config.adapter_name)
        optimizer = kwargs.get("optimizer")
        if config.ranks is not None and optimizer is not None:
            inner_optimizer(optimizer)  # a wrapper with no torch optimiser inside (DeepSpeed's) fails now, not later
        self.run = TsqLoRARun(model, config, state.max_steps, make_batch=self.make_batch, sampler=self.sampler)
        self.run.refresh(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.run.before_step(state.global_step)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        changes = self.run.after_step(state.global_step, optimizer)
        if changes:
            log.info("step %d: ranks changed in %d modules", state.global_step, len(changes))
        if self.run.refresh_due(state.global_step):
            self.run.refresh(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.run.finish()


class TsqLoRAMixin:
    """Put before a Trainer class: the quality sampler for training and the TsqLoRA callback."""

    def __init__(self, *args: Any, tsqlora: TsqLoRAConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tsqlora = TsqLoRACallback(tsqlora)
        self.add_callback(self.tsqlora)

    def _get_train_sampler(self, train_dataset: Any = None):
        quality = self.tsqlora.config.quality
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if quality is None:
            return super()._get_train_sampler(train_dataset)
        if dataset is None or not hasattr(dataset, "__len__"):
            raise ValueError("quality-aware sampling needs a training dataset with a length (not an "
                             "IterableDataset); set TsqLoRAConfig(quality=None) to keep only the dynamic ranks")
        sampler = QualitySampler(len(dataset), quality.temperature, quality.pool_size,
                                  quality.seed + self.args.seed, ess_fraction=quality.ess_fraction)
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
        except ImportError:  # pragma: no cover - datasets comes with transformers' training extras
            pass
        return self._get_collator_with_removed_columns(self.data_collator, description="training")


def tsqlora_trainer(trainer_class: type = Trainer) -> type:
    """``trainer_class`` with TsqLoRA: its constructor takes ``tsqlora=TsqLoRAConfig(...)``."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise ValueError(f"trainer_class must be a transformers.Trainer subclass, got {trainer_class!r}")
    return type(f"TsqLoRA{trainer_class.__name__}", (TsqLoRAMixin, trainer_class), {})


TsqLoRATrainer = tsqlora_trainer(Trainer)
