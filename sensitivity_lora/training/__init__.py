"""Training-time components: TsqLoRA's quality-aware sampling and dynamic ranks for the Hugging Face Trainer.

Importing this package imports transformers (the Trainer integration); the pieces
(:mod:`.quality`, :mod:`.sampler`, :mod:`.dynamic_ranks`) can be imported on their own.
"""
from __future__ import annotations

from .dynamic_ranks import DynamicRanks, RankSchedule
from .loop import TsqLoRAConfig, TsqLoRARun
from .quality import QualityConfig, score_candidates
from .sampler import QualitySampler
from .sensitivity import first_order_sensitivity, initial_ranks
from .trainer import TsqLoRACallback, TsqLoRATrainer, tsqlora_trainer

__all__ = ["DynamicRanks", "QualityConfig", "QualitySampler", "RankSchedule", "TsqLoRACallback", "TsqLoRAConfig",
           "TsqLoRARun", "TsqLoRATrainer", "first_order_sensitivity", "initial_ranks", "score_candidates",
           "tsqlora_trainer"]
