"""``transformers.Trainer`` integration: a callback that prunes after every optimiser step, and a small
Trainer subclass that adds it, keeps the dataset columns the base model takes and saves what trains."""
from __future__ import annotations

import inspect
import os
from typing import Any

from transformers import Trainer, TrainerCallback

from ..files import atomic_write

from .export import save_lora_adapter
from .model import HyperAdaLoraModel

STATE_FILE = "hyperadalora.safetensors"


class HyperAdaLoraCallback(TrainerCallback):
    """Calls ``model.update_and_allocate(step)`` after every optimiser step (before the gradients are
    cleared, as PEFT's AdaLoRA needs; the generated tensors' gradients are read by hooks anyway)."""

    def __init__(self, model: HyperAdaLoraModel) -> None:
        if not isinstance(model, HyperAdaLoraModel):
            raise TypeError(f"model must be a HyperAdaLoraModel (HyperAdaLoraCallback prunes its generated ranks), "
                            f"got {type(model).__name__}")
        self.model = model

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        total = self.model.hyper_config.total_steps
        if state.max_steps and state.max_steps != total:
            raise ValueError(f"the Trainer will run {state.max_steps} optimiser steps but the HyperAdaLoRA schedule "
                             f"was set for total_steps={total}: build the model with total_steps={state.max_steps} "
                             "(or set max_steps), or the final budget is reached at the wrong time or never")

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.model.update_and_allocate(state.global_step)  # 0-based here: global_step grows after this event


class HyperAdaLoraTrainer(Trainer):
    """A ``Trainer`` for a :class:`HyperAdaLoraModel`: adds :class:`HyperAdaLoraCallback`, takes the dataset
    columns the *base* model's forward accepts, and saves the hypernetwork and masks (plus the exported PEFT
    adapter once the final budget is in force) instead of the whole model."""

    def __init__(self, model: HyperAdaLoraModel, *args: Any, **kwargs: Any) -> None:
        super().__init__(model, *args, **kwargs)
        self.add_callback(HyperAdaLoraCallback(model))

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            names = list(inspect.signature(self.model.model.forward).parameters)
            self._signature_columns = names + list({"label", "label_ids", *self.label_names})

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        from safetensors.torch import save_file

        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model: HyperAdaLoraModel = self.model
        tensors = {f"hypernet.{k}": v.detach().contiguous().cpu() for k, v in model.hypernet.state_dict().items()}
        tensors |= {f"mask.{name}": mask.detach().cpu() for name, mask in model.masks().items()}
        atomic_write(os.path.join(output_dir, STATE_FILE), lambda tmp: save_file(tensors, tmp))  # never a torn file
        if model.allocator.final:
            save_lora_adapter(model, output_dir)
