"""Everything about a model that a run could change, captured and put back exactly.

``ModelState.capture(model)`` records, for every module: the module object under each
child name, its train/eval flag, its instance attributes (an instance-level ``forward``
such as accelerate's dispatch hook, flags other libraries set), every hook dictionary,
and for every parameter and buffer the tensor object, its storage, device, dtype and
``requires_grad``; and the attributes of ``model.config``. ``restore()`` puts all of it
back: children that were swapped (PEFT's injected LoRA layers), attributes that were added,
removed or rebound, hooks that were left behind, tensors that were moved or re-created
(their original storage is kept by reference, not copied), flags that were flipped.

Calibration runs inside :func:`preserved_state` (which restores on every exit), and
``get_peft_model`` restores a capture when its verification fails. Values written *into*
a tensor's storage in place are not undone (nothing here writes into model weights).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

_INTERNAL = ("_parameters", "_buffers", "_modules", "training")  # captured separately
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


@dataclass
class _TensorState:
    tensor: torch.Tensor | None  # the object in the module's dict
    data: torch.Tensor | None  # its storage (for parameters: the .data tensor), held by reference
    requires_grad: bool = False


@dataclass
class _ModuleState:
    module: nn.Module
    training: bool
    attributes: dict[str, Any]
    hooks: dict[str, dict]
    children: dict[str, nn.Module | None]
    parameters: dict[str, _TensorState]
    buffers: dict[str, _TensorState]


@dataclass
class ModelState:
    """A capture of ``model`` (see the module docstring); cheap: references, no copies of weights."""

    model: nn.Module
    modules: list[_ModuleState] = field(default_factory=list)
    config: dict[str, Any] | None = None

    @classmethod
    def capture(cls, model: nn.Module) -> "ModelState":
        state = cls(model)
        seen: set[int] = set()
        for module in model.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            d = module.__dict__
            state.modules.append(_ModuleState(
                module=module,
                training=module.training,
                attributes={k: v for k, v in d.items() if k not in _INTERNAL and k not in _HOOK_DICTS},
                hooks={k: dict(d[k]) for k in _HOOK_DICTS if k in d},
                children=dict(module._modules),
                parameters={k: _TensorState(p, p.data if p is not None else None,
                                            bool(p.requires_grad) if p is not None else False)
                            for k, p in module._parameters.items()},
                buffers={k: _TensorState(b, b) for k, b in module._buffers.items()},
            ))
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "__dict__"):
            state.config = dict(vars(config))
        return state

    def restore(self) -> None:
        """Put every captured piece back (idempotent)."""
        for s in self.modules:
            module, d = s.module, s.module.__dict__
            module._modules.clear()
            module._modules.update(s.children)
            for key in [k for k in d if k not in _INTERNAL and k not in _HOOK_DICTS and k not in s.attributes]:
                del d[key]  # added during the run (e.g. an instance-level forward, a library's flag)
            for key, value in s.attributes.items():
                if d.get(key, _MISSING) is not value:
                    d[key] = value
            for key, hooks in s.hooks.items():
                if key in d and dict(d[key]) != hooks:
                    d[key].clear()
                    d[key].update(hooks)
            d["training"] = s.training
            for key in [k for k in module._parameters if k not in s.parameters]:
                del module._parameters[key]
            for key, t in s.parameters.items():
                param = t.tensor
                module._parameters[key] = param
                if param is None:
                    continue
                if not _same_storage(param.data, t.data):
                    param.data = t.data
                if param.requires_grad != t.requires_grad:
                    param.requires_grad_(t.requires_grad)
            for key in [k for k in module._buffers if k not in s.buffers]:
                del module._buffers[key]
            for key, t in s.buffers.items():
                module._buffers[key] = t.tensor
        if self.config is not None:
            config = self.model.config
            for key in [k for k in vars(config) if k not in self.config]:
                delattr(config, key)
            for key, value in self.config.items():
                if vars(config).get(key, _MISSING) is not value:
                    config.__dict__[key] = value


_MISSING = object()


def _same_storage(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    if b is None:
        return True
    if a.device != b.device or a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.device.type == "meta":
        return True
    return a.data_ptr() == b.data_ptr()


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[ModelState]:
    """Evaluation mode and no gradients inside; the whole captured state restored after, also on error."""
    state = ModelState.capture(model)
    try:
        model.eval()
        with torch.no_grad():
            yield state
    finally:
        state.restore()
