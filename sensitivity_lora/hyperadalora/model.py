"""The trainable model: a base model whose target linears carry generated updates, and the generator.

Attribute layout mirrors PEFT's (``peft_model.base_model.model`` is the wrapped model, and
unknown attributes fall through to it), so code written against a ``PeftModel`` finds the
base model's head or ``config`` here too.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..calibration.model_state import ModelState
from ..calibration.targets import block_containers, module_dims, module_weight, resolve_targets
from .allocator import RankAllocator
from .config import HyperAdaLoraConfig
from .hypernet import HyperNetwork, ModuleSpec, weight_statistics
from .layers import HyperLoraLinear
from .regularizer import orthogonality_penalty


def _check_rank_fits(model: nn.Module, targets: list[str], config: HyperAdaLoraConfig) -> None:
    """Every target can hold ``init_rank`` triplets: a rank above min(d_in, d_out) adds nothing but parameters."""
    for name in targets:
        d_in, d_out = module_dims(model.get_submodule(name))
        if config.init_rank > min(d_in, d_out):
            raise ValueError(f"init_rank {config.init_rank} (from avg_rank {config.avg_rank}) exceeds the width of "
                             f"{name} ({d_out} × {d_in}): a rank is at most min(d_in, d_out) = {min(d_in, d_out)}; "
                             "lower avg_rank (or init_rank)")


def module_specs(model: nn.Module, targets: list[str]) -> list[ModuleSpec]:
    """Layer index and type of every target: ``<blocks>.<i>.<type>``; a module outside the blocks is a type
    of its own at layer index (number of blocks)."""
    containers = block_containers(model)
    offsets, total = {}, 0
    for c in containers:
        offsets[c] = total
        total += len(model.get_submodule(c))
    placed: list[tuple[str, int, str]] = []
    for name in targets:
        container = next((c for c in containers if name.startswith(c + ".")), None)
        index, _, kind = name[len(container) + 1:].partition(".") if container else ("", "", name)
        layer = offsets[container] + int(index) if container and index.isdigit() else total
        placed.append((name, layer, kind or name))
    kinds = {k: i for i, k in enumerate(sorted({k for _, _, k in placed}))}
    specs = []
    for name, layer, kind in placed:
        d_in, d_out = module_dims(model.get_submodule(name))
        specs.append(ModuleSpec(name, layer, kinds[kind], d_in, d_out))
    return specs


class HyperAdaLoraModel(nn.Module):
    """``model`` (changed in place, its weights frozen) with HyperAdaLoRA on its target modules."""

    def __init__(self, model: nn.Module, config: HyperAdaLoraConfig) -> None:
        super().__init__()
        if not isinstance(config, HyperAdaLoraConfig):
            raise TypeError(f"config must be a HyperAdaLoraConfig, got {type(config).__name__}")
        if any(isinstance(m, HyperLoraLinear) for m in model.modules()):
            raise ValueError("this model already carries HyperAdaLoRA layers: pass the original model")
        targets = resolve_targets(model, config.target_modules)
        _check_rank_fits(model, targets, config)
        specs = module_specs(model, targets)
        stats = ({n: weight_statistics(module_weight(model.get_submodule(n)), config.chunk_size) for n in targets}
                 if config.weight_stats else None)
        before = ModelState.capture(model)
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            layers = {}
            for name in targets:
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                layers[name] = HyperLoraLinear(getattr(parent, child), config.init_rank, config.scale,
                                               config.lora_dropout)
                setattr(parent, child, layers[name])
            self.model = model
            self.hypernet = HyperNetwork(specs, config, stats).to(next(model.parameters()).device)
        except BaseException:
            before.restore()
            raise
        self.hyper_config, self.targets = config, targets
        self._layers = layers  # a plain dict: they are submodules of ``model`` already
        self.allocator = RankAllocator(targets, config)
        self._cache_key: tuple | None = None
        self._current: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._hook = model.register_forward_pre_hook(self._before_forward)

    # -- generation ------------------------------------------------------------------------
    def _before_forward(self, module: nn.Module, args: Any) -> None:
        self.generate_updates()

    def generate_updates(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Run the hypernetwork and hand every layer its P, Λ ⊙ mask, Q; returns ``{name: (P, Λ, Q)}``.

        With gradients on, this runs at every forward (a fresh graph each time) and, in training
        mode, hooks the tensors' gradients for the allocator. Without gradients the result is kept
        until a parameter or a mask changes (generation, evaluation loops).
        """
        grad = torch.is_grad_enabled()
        key = None if grad else tuple((t.data_ptr(), t._version) for t in
                                      [*self.hypernet.parameters(), *(l.mask for l in self._layers.values())])
        if key is not None and key == self._cache_key:
            return self._current
        out = self.hypernet()
        watch = grad and self.training
        for name, (p, lam, q) in out.items():
            layer = self._layers[name]
            lam_masked = lam * layer.mask
            layer.set_update(p, lam_masked, q)
            if watch:
                self.allocator.watch(name, p, lam, lam_masked, q)
        self._current, self._cache_key = out, key
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward; in training, with a loss, AdaLoRA's orthogonality penalty added to it."""
        outputs = self.model(*args, **kwargs)
        weight = self.hyper_config.orth_reg_weight
        loss = getattr(outputs, "loss", None)
        if self.training and weight > 0 and isinstance(loss, torch.Tensor):
            outputs.loss = loss + weight * orthogonality_penalty((p, q) for p, _, q in self._current.values())
        return outputs

    # -- allocation -----------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        return {name: layer.mask for name, layer in self._layers.items()}

    def update_and_allocate(self, step: int) -> int:
        """Call after every ``optimizer.step()`` (step counted from 0): importance, then pruning."""
        budget = self.allocator.update_and_allocate(self.masks(), step)
        self.release_updates()  # stale after the step; and tensors of a graph cannot be deep-copied
        return budget

    def release_updates(self) -> None:
        """Drop the last generated tensors (the next forward generates afresh)."""
        for layer in self._layers.values():
            layer.set_update(None)
        self._current, self._cache_key = {}, None

    def finalize_ranks(self) -> None:
        """Fix the final budget now (e.g. a run stopped before the schedule's final phase)."""
        self.allocator.finalize(self.masks())

    def ranks(self, targets: list[str] | None = None) -> dict[str, int]:
        """Triplets each target keeps now, in target order."""
        return {name: self._layers[name].rank() for name in (targets or self.targets)}

    def parameter_counts(self) -> dict[str, int]:
        """The hypernetwork's size against what it writes (AdaLoRA's P, Λ, Q) and the final LoRA's A and B."""
        dims = {s.name: (s.d_in, s.d_out) for s in self.hypernet.specs}
        return {"hypernetwork": self.hypernet.num_parameters(), "generated": self.hypernet.num_generated(),
                "lora_at_target_rank": sum(self.hyper_config.avg_rank * (i + o) for i, o in dims.values())}

    # -- PEFT-like layout -----------------------------------------------------------------
    @property
    def base_model(self) -> "HyperAdaLoraModel":
        return self

    def layers(self) -> dict[str, HyperLoraLinear]:
        return dict(self._layers)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model" or name.startswith("__"):  # never during __init__, never copy/pickle protocols
                raise
            return getattr(self.model, name)

    def unload(self) -> nn.Module:
        """Put the original linears back and return the base model (the generated updates are dropped)."""
        self._hook.remove()
        for name, layer in self._layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, layer.base_layer)
        self._layers = {}
        return self.model
