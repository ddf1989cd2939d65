"""Glue: llm-compressor's GPTQ with this package as its Hessian source (llm-compressor 0.14 only).

    from llmcompressor.modifiers.gptq import GPTQModifier
    from sensitivity_lora.hessians.llmcompressor import gptq_quantize
    modifier = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    gptq_quantize(model, batches, modifier)                        # sequential, as llm-compressor's default
    gptq_quantize(model, batches, modifier, sequential=False)      # one-shot from the unchanged model
    gptq_quantize(model, None, modifier, source="hessians/")       # from an export folder

The modifier's own lifecycle runs (initialise: its scheme attached to the modules; calibration start:
its weight observers; per block: its observers, its ``quantize_weight`` solve and its parameter
updates; calibration end; finalise), so the quantised model is what ``oneshot`` would give; only
the Hessians come from here: the streaming engine (block by block; ``sequential``: each block's
statistics measured on the outputs of the blocks already quantised, as llm-compressor's sequential
pipeline with ``propagate_error=True`` does) or a ``source`` (``gptq.gptq_hessians``'s sources).
The modifier's own accumulation hooks are switched off meanwhile.

**Private extension points.** llm-compressor has no public way to hand GPTQ a Hessian: this fills
``GPTQModifier._hessians`` (its un-normalised fp32 sum, 2·Σxxᵀ) and ``_num_samples`` (the sequence
count that ``prepare_batch`` divides by) and reads ``_module_names``, as its own hook does
(``llmcompressor/modifiers/gptq/base.py``, ``calibrate_module``). These are private and may change
in any release, so other versions are refused (``SUPPORTED``) rather than trusted.

Weight-only schemes (W4A16, W8A16, ...): activation quantisation needs llm-compressor's observers on
its own calibration passes, so such schemes are refused.

Padding: llm-compressor counts padded positions as inputs; this package drops them. The Hessians
agree for unpadded batches (llm-compressor's default batch size 1).
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..errors import MissingPackageError, TargetError
from .gptq import _groups, _renamer

SUPPORTED = ("0.14.",)


def check_version() -> str:
    """The installed llm-compressor version; raises unless it is one whose private GPTQ state is known."""
    try:
        import llmcompressor
    except ImportError as exc:
        raise MissingPackageError("llmcompressor", "pip install 'llmcompressor==0.14.*'",
                                  "GPTQ through llm-compressor") from exc
    version = getattr(llmcompressor, "__version__", "?")
    if not version.startswith(SUPPORTED):
        raise ImportError(
            f"llm-compressor {version} is installed; this glue fills GPTQModifier's private _hessians/_num_samples "
            f"and is written for {', '.join(v + '*' for v in SUPPORTED)} only: install that, or use "
            "sensitivity_lora.hessians.gptq.gptq_hessians with your own code")
    return version


def fill(modifier: Any, model: nn.Module, source: Any, *, prefix: str = "",
         modules: Iterable[nn.Module] | None = None) -> list[nn.Module]:
    """Put ``source``'s Hessians into ``modifier`` (initialised) for the modules it quantises (``modules``: only
    these); returns the modules filled. Names are matched onto ``model`` as in ``gptq.gptq_hessians``."""
    lookup = dict(model.named_modules())
    rename = _renamer(model, prefix)
    known = modifier._module_names  # module → name, the modules the modifier quantises
    allowed = set(modules) if modules is not None else None
    filled = []
    for group in _groups(source):
        raw = None
        for member in group.members:
            module = lookup[rename(member)]
            if module not in known or (allowed is not None and module not in allowed):
                continue
            if raw is None:  # the form its hook accumulates: 2·Σxxᵀ in fp32, divided by the count later
                raw = (2.0 * group.xtx).to(torch.float32)
            device = module.weight.device
            modifier._hessians[module] = raw.to(device, copy=True)  # its solver works in place
            modifier._num_samples[module] = torch.tensor(float(group.n_sequences), device=device)
            filled.append(module)
    return filled


def gptq_quantize(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]] | None, modifier: Any, *,
                  sequential: bool = True, source: Any = None, prefix: str = "", backend: str | None = None,
                  progress: bool = True) -> Any:
    """Quantise ``model`` in place with llm-compressor's ``modifier`` (a ``GPTQModifier``, not yet initialised),
    the Hessians from this package; returns the modifier (finalised). See the module docstring."""
    check_version()
    from llmcompressor.core import Event, EventType, State
    from llmcompressor.modifiers.utils.hooks import HooksMixin
    from llmcompressor.utils.helpers import DisableQuantization

    if (batches is None) == (source is None):
        raise ValueError("pass calibration batches (the engine computes the Hessians) or source= (an export folder "
                         "or in-memory statistics), not both")
    if source is not None and sequential:
        raise ValueError("a stored source is one-shot by nature (from the unchanged model): pass sequential=False, "
                         "or batches for the sequential mode")
    _check_weight_only(modifier)
    state = State(model=model)
    modifier.initialize(state)
    modifier.update_event(state, Event(type_=EventType.CALIBRATION_START))
    names = list(modifier._module_names.values())
    with HooksMixin.disable_hooks(), DisableQuantization(model):
        if source is not None:
            filled = fill(modifier, model, _from_path(source), prefix=prefix)
            _check_all(modifier, filled)
            _compress(modifier, state, list(model.modules()))
        else:
            _from_engine(model, batches, modifier, state, names, sequential, backend, progress)
    modifier.update_event(state, Event(type_=EventType.CALIBRATION_END))
    modifier.finalize(state)
    return modifier


def _check_weight_only(modifier: Any) -> None:
    """Activation quantisation needs llm-compressor's own observers on its own calibration passes: refused."""
    config = modifier.resolve_quantization_config()
    acting = [name for name, scheme in config.config_groups.items()
              if scheme.input_activations is not None or scheme.output_activations is not None]
    if acting or getattr(config, "kv_cache_scheme", None) is not None:
        raise ValueError(f"scheme {', '.join(acting) or 'kv_cache'} quantises activations; this glue serves "
                         "weight-only schemes (W4A16, W8A16, ...): run llm-compressor's own oneshot for it")


def _from_path(source: Any) -> Any:
    if isinstance(source, (str, os.PathLike)):
        from .format import load_hessians

        return load_hessians(source, by="group")
    return source


def _compress(modifier: Any, state: Any, modules: list[nn.Module]) -> None:
    from llmcompressor.core import Event, EventType

    modifier.update_event(state, Event(type_=EventType.SEQUENTIAL_EPOCH_END), modules=modules)


def _check_all(modifier: Any, filled: list[nn.Module], modules: Iterable[nn.Module] | None = None) -> None:
    wanted = [m for m in modifier._module_names if modules is None or m in set(modules)]
    missing = [modifier._module_names[m] for m in wanted if m not in set(filled)]
    if missing:
        raise TargetError(f"no Hessian for {len(missing)} module(s) the modifier quantises ({', '.join(missing[:3])}); "
                          "calibrate them (target_modules) or add them to the modifier's ignore list")


def _from_engine(model, batches, modifier, state, names, sequential, backend, progress) -> None:
    from ..calibration.streaming import iter_block_statistics
    from ..calibration.streaming import plan_streaming, StreamingUnsupported

    try:
        plan_streaming(model, names)
    except StreamingUnsupported as exc:
        raise TargetError(f"the modifier quantises modules the streaming engine cannot reach ({exc}); add them to "
                          "its ignore list (e.g. ignore=['lm_head'])") from exc
    for block in iter_block_statistics(model, batches, names, "full", backend, sequential=sequential,
                                       progress=progress):
        members = [model.get_submodule(m) for g in block.stats.groups.values() for m in g.members]
        filled = fill(modifier, model, block.stats.groups, modules=members)
        _check_all(modifier, filled, members)
        block.stats = None  # the modifier holds its own fp32 copies now
        _compress(modifier, state, members)
