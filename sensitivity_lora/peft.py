"""From an allocation to PEFT: a LoraConfig with per-module ranks, and a check that PEFT obeyed it.

PEFT matches ``rank_pattern`` keys as regexes against the end of a module name
and silently ignores keys that match nothing, so keys here are full,
regex-escaped module paths, and :func:`verify_ranks` checks the built model.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from torch import nn

from .errors import RankMismatchError
from .init.state import PEFT_MODEL_PREFIX
from .scoring.result import Allocation
from .settings import check_avg_rank

RESERVED_KEYS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")
# what PEFT's save_pretrained writes for one adapter: a new save replaces all of these whole
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md")


def check_lora_kwargs(lora_kwargs: Mapping[str, Any]) -> None:
    """Reject what LoraConfig would reject, before any calibration: fields the allocation sets itself,
    names LoraConfig does not have (with the closest ones), and values it refuses."""
    from peft import LoraConfig

    if not isinstance(lora_kwargs, Mapping) or not all(isinstance(k, str) for k in lora_kwargs):
        raise ValueError(f"lora_kwargs must be a mapping of LoraConfig field names to values, got {lora_kwargs!r}")
    for key in RESERVED_KEYS:
        if key in lora_kwargs:
            hint = "pass lora_alpha= on its own" if key == "lora_alpha" else "the allocation sets it"
            raise ValueError(f"{key!r} cannot be given in the LoRA keyword arguments: {hint}")
    fields = sorted(f.name for f in dataclasses.fields(LoraConfig) if f.init)
    for key in lora_kwargs:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else "see peft.LoraConfig for its fields"
            raise ValueError(f"{key!r} is not a LoraConfig field ({hint})")
    import typing

    hints = typing.get_type_hints(LoraConfig)
    for key, value in lora_kwargs.items():  # PEFT checks few values itself: their declared types here
        if key in hints and not _matches(value, hints[key]):
            raise ValueError(f"{key}={value!r} is not a valid value: LoraConfig declares it as {_type_name(hints[key])}")
    dropout = lora_kwargs.get("lora_dropout", 0.0)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_dropout={dropout!r} must lie in [0, 1)")
    try:  # PEFT's own checks of the values and of their combinations
        LoraConfig(r=1, lora_alpha=1.0, target_modules=["_"], **lora_kwargs)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"LoraConfig refuses these LoRA keyword arguments: {exc}") from None


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the type annotation ``hint`` (types this cannot judge count as fitting)."""
    import enum
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        for choice in args:
            if isinstance(choice, str) and "[" in choice:  # a template such as 'pissa_niter_[number of iters]'
                if isinstance(value, str) and value.startswith(choice.split("[", 1)[0]):
                    return True
            elif value == choice and type(value) is type(choice):
                return True
        return False
    if origin in (list, tuple, set, frozenset):
        return isinstance(value, (list, tuple, set, frozenset)) and (
            not args or all(_matches(v, args[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, Mapping)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, (hint, str))
    return True


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def check_lora_alpha(lora_alpha: Any) -> None:
    """lora_alpha is None (2 · r̄) or a positive finite number."""
    if lora_alpha is None:
        return
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, Real) or not math.isfinite(lora_alpha) \
            or lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be a positive finite number (or None for 2 · avg_rank), got {lora_alpha!r}")


def _sorted_sets(value: Any) -> Any:
    """Sets (and frozensets) as sorted lists, at any depth: JSON has no sets, and their order is the hash seed's."""
    if isinstance(value, (set, frozenset)):
        return sorted(_sorted_sets(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _sorted_sets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sorted_sets(v) for v in value]
    return value


def lora_config_json(config) -> str:
    """``adapter_config.json`` for ``config`` as PEFT's ``save_pretrained`` writes it (indent 2, sorted keys),
    but byte-for-byte reproducible: every set (``target_modules``) sorted, and standard JSON (no NaN)."""
    return json.dumps(_sorted_sets(config.to_dict()), indent=2, sort_keys=True, allow_nan=False)


def lora_config(allocation: Allocation, lora_alpha: float | None = None, **lora_kwargs: Any):
    """A ``peft.LoraConfig`` that gives every allocated module its rank.

    ``lora_alpha`` is the alpha the user would give uniform LoRA at rank
    ``avg_rank`` (default ``2 * avg_rank``). Each module's alpha keeps its
    step-size scale equal to uniform LoRA's: ``alpha_w = lora_alpha * r_w / avg_rank``
    (scale alpha/r), or ``lora_alpha * sqrt(r_w / avg_rank)`` with ``use_rslora=True``
    (scale alpha/√r). Other keyword arguments (``lora_dropout``, ``task_type``,
    ``bias``, ``modules_to_save``, ...) go to LoraConfig.
    """
    if not isinstance(allocation, Allocation):
        raise ValueError(f"allocation must be an Allocation (from compute_allocation or Allocation.load), "
                         f"got {type(allocation).__name__}")
    return lora_config_from_ranks(allocation.ranks(), allocation.avg_rank, lora_alpha, **lora_kwargs)


def lora_config_from_ranks(ranks: Mapping[str, int], avg_rank: float, lora_alpha: float | None = None,
                           **lora_kwargs: Any):
    """:func:`lora_config` for any ``{full module name: rank}`` (e.g. another tool's ranks).

    Modules of rank 0 get no adapter. ``avg_rank`` is the uniform rank the budget was set from;
    the step-size scale of every module is uniform LoRA's at that rank, as in :func:`lora_config`.
    """
    from peft import LoraConfig

    check_lora_kwargs(lora_kwargs)
    check_avg_rank(avg_rank)
    check_lora_alpha(lora_alpha)
    avg = float(avg_rank)
    alpha = float(lora_alpha) if lora_alpha is not None else 2.0 * avg
    if not isinstance(ranks, Mapping):
        raise ValueError(f"ranks must be a mapping of module names to ranks, got {type(ranks).__name__}")
    bad = {name: r for name, r in ranks.items()
           if isinstance(r, bool) or not isinstance(r, Integral) or r < 0 or not isinstance(name, str)}
    if bad:
        raise ValueError(f"ranks must be non-negative integers, got {bad}")
    ranks = {name: int(r) for name, r in ranks.items() if r > 0}
    if not ranks:
        raise ValueError("every rank is 0: there is nothing to adapt")
    rslora = bool(lora_kwargs.get("use_rslora", False))

    def module_alpha(r: int) -> float:
        return alpha * math.sqrt(r / avg) if rslora else alpha * r / avg

    default_rank = max(1, int(round(avg)))
    return LoraConfig(
        r=default_rank,
        lora_alpha=module_alpha(default_rank),
        target_modules=sorted(ranks),
        rank_pattern={re.escape(name): r for name, r in ranks.items()},
        alpha_pattern={re.escape(name): module_alpha(r) for name, r in ranks.items()},
        **lora_kwargs,
    )


def base_module_name(peft_name: str, names: set[str]) -> str | None:
    """Which of ``names`` a (possibly prefixed, e.g. ``base_model.model.``) PEFT module name refers to."""
    parts = peft_name.split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:])
        if candidate in names:
            return candidate
    return None


def lora_layers(peft_model: nn.Module, names: set[str], adapter_name: str = "default") -> Iterator[tuple[str, str | None, nn.Module]]:
    """Every LoRA layer of ``adapter_name``: (its module path, which of ``names`` it adapts or None, the layer)."""
    for path, module in adapter_layers(peft_model, adapter_name):
        yield path, base_module_name(path, names), module


def _report(problems: list[str], what: str) -> None:
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise RankMismatchError(f"the PEFT model does not match {what}: {shown}")


def _check_equal_scales(scales: Mapping[str, float], problems: list[str]) -> None:
    if scales and max(scales.values()) > min(scales.values()) * (1 + 1e-6):
        low, high = min(scales, key=scales.get), max(scales, key=scales.get)
        problems.append(f"step-size scales differ: {low} {scales[low]:.4g} vs {high} {scales[high]:.4g} "
                        "(set alpha_pattern with lora_config, which keeps them equal)")


def verify_ranks(peft_model: nn.Module, expected: "Allocation | str | os.PathLike | Any",
                 adapter_name: str = "default") -> None:
    """Raise RankMismatchError unless the LoRA layers of ``adapter_name`` carry the expected ranks.

    ``expected`` is an :class:`Allocation` (every allocated module has a layer of exactly its rank,
    and one step-size scale), or a LoraConfig, or an adapter folder written by ``save_pretrained``
    (its ``adapter_config.json``): every layer's rank and scale are those its ``rank_pattern`` and
    ``alpha_pattern`` give, matched as PEFT matches them, so a saved adapter is checked on its own.
    """
    if isinstance(expected, Allocation):
        _verify_against_allocation(peft_model, expected, adapter_name)
    else:
        _verify_against_config(peft_model, _as_lora_config(expected), adapter_name)


def _verify_against_allocation(peft_model: nn.Module, allocation: Allocation, adapter_name: str) -> None:
    ranks = allocation.ranks()
    expected = {n: r for n, r in ranks.items() if r > 0}  # rank 0: no adapter
    found: dict[str, int] = {}
    scales: dict[str, float] = {}
    problems = []
    for name, target, module in lora_layers(peft_model, set(ranks), adapter_name):
        if target is not None and ranks[target] == 0:
            problems.append(f"{target} has a LoRA layer but was allocated rank 0")
            continue
        if target is None:
            problems.append(f"{name} has a LoRA layer but no allocation")
            continue
        rank = int(module.r[adapter_name])
        found[target] = rank
        scales[target] = float(module.scaling[adapter_name])
        if rank != expected[target]:
            problems.append(f"{target}: rank {rank}, allocated {expected[target]}")
    problems += [f"{n}: no LoRA layer (allocated rank {expected[n]})" for n in expected if n not in found]
    _check_equal_scales(scales, problems)
    _report(problems, "the allocation")


def _as_lora_config(source: Any):
    from peft import LoraConfig, PeftConfig

    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{folder} has no adapter_config.json (not an adapter folder written by "
                                    "save_pretrained)")
        source = PeftConfig.from_pretrained(str(folder))
    if not isinstance(source, LoraConfig):
        raise ValueError(f"expected an Allocation, a LoraConfig or an adapter folder, got {type(source).__name__}")
    return source


def pattern_key(keys: Iterable[str], name: str) -> str | None:
    """The first ``rank_pattern``/``alpha_pattern`` key that matches module ``name`` as PEFT matches it
    (a regex for the end of the name, after a dot), or None."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _verify_against_config(peft_model: nn.Module, config: Any, adapter_name: str) -> None:
    problems, seen = [], set()
    for path, module in adapter_layers(peft_model, adapter_name):
        key = base_key(path)
        seen.add(key)
        rank_key, alpha_key = pattern_key(config.rank_pattern or {}, key), pattern_key(config.alpha_pattern or {}, key)
        rank = config.rank_pattern[rank_key] if rank_key is not None else config.r
        alpha = config.alpha_pattern[alpha_key] if alpha_key is not None else config.lora_alpha
        scale = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        found_rank, found_scale = int(module.r[adapter_name]), float(module.scaling[adapter_name])
        if found_rank != rank:
            problems.append(f"{key}: rank {found_rank}, the config gives {rank}")
        elif not math.isclose(found_scale, scale, rel_tol=1e-6):
            problems.append(f"{key}: scale {found_scale:.6g}, the config gives {scale:.6g}")
    targets = config.target_modules
    if isinstance(targets, (set, list, tuple)) and all("." in t for t in targets):  # full paths: each needs a layer
        problems += [f"{t}: listed in target_modules but has no LoRA layer" for t in sorted(targets) if t not in seen]
    if not seen:
        problems.append(f"no LoRA layer of adapter {adapter_name!r}")
    _report(problems, "the adapter config")


def base_key(path: str) -> str:
    """A PeftModel module path as the base model names it (the key PEFT's patterns are matched against)."""
    return path.removeprefix(PEFT_MODEL_PREFIX)


def adapter_layers(peft_model: nn.Module, adapter_name: str) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for path, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "r", {}):
            yield path, module


def build_peft_model(model: nn.Module, allocation: Allocation, config: Any, adapter_name: str = "default"):
    """PEFT's ``get_peft_model(model, config)``, its ranks verified against ``allocation`` and the
    allocation's initial A (if any) applied; on any error the model is put back as it was."""
    from peft import get_peft_model as peft_get_peft_model

    from .calibration.model_state import ModelState

    before = ModelState.capture(model)  # PEFT changes ``model`` in place: children, requires_grad, flags
    try:
        peft_model = peft_get_peft_model(model, config, adapter_name=adapter_name)
        verify_ranks(peft_model, allocation, adapter_name)
        if allocation.initial_weights is not None:
            apply_initial_weights(peft_model, allocation, adapter_name)
    except BaseException:
        before.restore()  # the injected layers out, every requires_grad flag and attribute as it was
        raise
    return peft_model


def apply_initial_weights(peft_model: nn.Module, allocation: Allocation, adapter_name: str = "default") -> None:
    """Copy the allocation's initial A into every LoRA layer and set B = 0 (the adapter starts as the identity)."""
    if allocation.initial_weights is None:
        raise ValueError("this allocation has no initial weights (compute it with an init other than 'none')")
    apply_a_matrices(peft_model, allocation.initial_weights, allocation.ranks(), adapter_name)


def apply_a_matrices(peft_model: nn.Module, weights: Mapping[str, Any], ranks: Mapping[str, int],
                     adapter_name: str = "default") -> None:
    """Copy ``weights[m]`` (rank × d_in) into the LoRA A of every module m of ``ranks`` and set B = 0;
    every module of positive rank must have a layer of that rank, no rank-0 module may have one."""
    import torch

    done = set()
    with torch.no_grad():
        for _, target, module in lora_layers(peft_model, set(ranks), adapter_name):
            if target is None:
                continue
            if ranks[target] == 0:
                raise RankMismatchError(f"{target} has a LoRA layer but was given rank 0")
            a = weights[target]
            weight_a = module.lora_A[adapter_name].weight
            if tuple(weight_a.shape) != tuple(a.shape):
                raise RankMismatchError(f"{target}: LoRA A has shape {tuple(weight_a.shape)}, the initial weight "
                                        f"{tuple(a.shape)}")
            weight_a.copy_(a.to(device=weight_a.device, dtype=weight_a.dtype))
            module.lora_B[adapter_name].weight.zero_()
            done.add(target)
    missing = [n for n, r in ranks.items() if r > 0 and n not in done]
    if missing:
        raise RankMismatchError(f"{len(missing)} modules with initial weights have no LoRA layer (e.g. {missing[0]})")


def build_peft_model_from_ranks(model: nn.Module, ranks: Mapping[str, int], initial_weights: Mapping[str, Any],
                                avg_rank: float, lora_alpha: float | None = None, adapter_name: str = "default",
                                **lora_kwargs: Any):
    """PEFT's ``get_peft_model`` with per-module ``ranks`` (0: no adapter) from :func:`lora_config_from_ranks`
    (α/r constant), every layer checked against the config (:func:`verify_ranks`), A = ``initial_weights``
    and B = 0; on any error the model is put back as it was."""
    from peft import get_peft_model as peft_get_peft_model

    from .calibration.model_state import ModelState

    config = lora_config_from_ranks(ranks, avg_rank, lora_alpha, **lora_kwargs)
    before = ModelState.capture(model)
    try:
        peft_model = peft_get_peft_model(model, config, adapter_name=adapter_name)
        verify_ranks(peft_model, config, adapter_name)
        apply_a_matrices(peft_model, initial_weights, ranks, adapter_name)
    except BaseException:
        before.restore()
        raise
    return peft_model
