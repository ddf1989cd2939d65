"""HyperAdaLoRA (arXiv 2510.02630; docs/method.md §9): AdaLoRA's P Λ Q written by a small attention
hypernetwork, ranks allocated by pruning the generated Λ, exported as a plain PEFT LoRA adapter.

    model = get_hyperadalora_model(base, avg_rank=8, total_steps=1000)
    ... train (HyperAdaLoraCallback with a transformers.Trainer, or call
        model.update_and_allocate(step) after every optimizer.step()) ...
    peft_model = to_peft_model(model)      # or save_lora_adapter(model, "adapter/")
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .allocator import RankAllocator
from .config import HyperAdaLoraConfig
from .export import save_lora_adapter, to_peft_model
from .hypernet import HyperNetwork
from .layers import HyperLoraLinear
from .model import HyperAdaLoraModel


def get_hyperadalora_model(model: nn.Module, avg_rank: int, total_steps: int, **settings: Any) -> HyperAdaLoraModel:
    """``model`` (changed in place) wrapped for HyperAdaLoRA training; ``settings`` are
    :class:`HyperAdaLoraConfig` fields (``init_rank``, ``lora_alpha``, ``hidden_size``, ...)."""
    return HyperAdaLoraModel(model, HyperAdaLoraConfig(avg_rank=avg_rank, total_steps=total_steps, **settings))


def __getattr__(name: str) -> Any:  # the Trainer integration imports transformers: only when asked for
    if name in ("HyperAdaLoraCallback", "HyperAdaLoraTrainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["HyperAdaLoraConfig", "HyperAdaLoraModel", "HyperNetwork", "HyperLoraLinear", "RankAllocator",
           "get_hyperadalora_model", "to_peft_model", "save_lora_adapter", "HyperAdaLoraCallback",
           "HyperAdaLoraTrainer"]
