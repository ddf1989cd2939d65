"""Forward hooks that feed layer inputs to the statistics, with input groups and padding masks.

Only this module (and the streaming driver) touches the model. Modules that read
the very same input tensor (q/k/v, gate/up, BERT query/key/value) are found at
run time by tensor identity, not from a table of names, and share one
accumulator: the statistic is computed once per distinct input.
"""
from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .statistics import CalibrationError, GroupStatistics
from .targets import module_dims, resolve_targets


@dataclass
class CalibrationStatistics:
    """Everything calibration measured: one entry per input group, and the module → group map."""

    groups: dict[str, GroupStatistics]
    module_group: dict[str, str]
    dims: dict[str, tuple[int, int]]  # module → (d_in, d_out)
    mode: str

    @property
    def n_tokens(self) -> int:
        return max((g.n_tokens for g in self.groups.values()), default=0)


def _tensor_key(x: torch.Tensor) -> tuple:
    return (x.device, x.dtype, x.data_ptr(), tuple(x.shape), tuple(x.stride()))


class _BatchContext:
    """The attention mask of the batch being run, shared by all hooks."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # (batch, seq) bool, on the model's device
        self.flat_mask: torch.Tensor | None = None
        self.n_valid = 0
        self.n_sequences = 0
        # data key → (weakref to the tensor, its version, group) for the current forward
        self.seen: dict[tuple, tuple[weakref.ref, int, str]] = {}

    def set(self, mask: torch.Tensor | None, n_sequences: int, n_tokens: int) -> None:
        self.seen.clear()
        self.n_sequences = n_sequences
        if mask is None:
            self.mask = self.flat_mask = None
            self.n_valid = n_tokens
            return
        self.mask = mask.to(torch.bool)
        self.flat_mask = self.mask.reshape(-1)
        self.n_valid = int(self.flat_mask.sum())
        if self.n_valid == self.flat_mask.numel():
            self.flat_mask = None  # nothing to drop: skip the gather


class StatisticsHooks:
    """Context manager: installs pre-forward hooks on the target modules, removes them on exit."""

    def __init__(self, modules: Mapping[str, nn.Module], mode: str = "diag", backend: str | None = None,
                 device: torch.device | str | None = None) -> None:
        self.modules = dict(modules)
        self.mode = mode
        self.backend = backend
        self.device = device
        self.context = _BatchContext()
        self.groups: dict[str, GroupStatistics] = {}
        self.module_group: dict[str, str] = {}
        self._handles: list = []

    def __enter__(self) -> "StatisticsHooks":
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.context.seen.clear()

    def result(self, dims: Mapping[str, tuple[int, int]]) -> CalibrationStatistics:
        for group in self.groups.values():
            group.check_finite()
        return CalibrationStatistics(self.groups, dict(self.module_group), dict(dims), self.mode)

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                raise CalibrationError(f"{name} was called without a tensor input; cannot capture it")
            self._observe(name, args[0])

        return hook

    def _observe(self, name: str, x: torch.Tensor) -> None:
        ctx = self.context
        key = _tensor_key(x)
        hit = ctx.seen.get(key)
        if hit is not None:
            ref, version, group = hit
            earlier = ref()
            if earlier is not None and earlier._version == version:  # alive and unmodified: the same data
                known = self.module_group.setdefault(name, group)
                if known == group:
                    if name not in self.groups[group].members:
                        self.groups[group].members.append(name)
                    return  # the group's leader already accumulated this very input
        group = self.module_group.setdefault(name, name)  # a new input: this module leads its own group
        if group != name:
            raise CalibrationError(
                f"{name} shared its input with {group} on the first batch but not on a later one; "
                "this model routes inputs dynamically, which calibration cannot group"
            )
        if group not in self.groups:
            self.groups[group] = GroupStatistics(group, [name], x.shape[-1], self.mode,
                                                 torch.device(self.device or x.device), self.backend)
        tokens = x.reshape(-1, x.shape[-1])
        mask, n_valid = ctx.flat_mask, ctx.n_valid
        if ctx.mask is None or tokens.shape[0] != ctx.mask.numel():
            if mask is not None:
                raise CalibrationError(
                    f"{name} saw {tokens.shape[0]} tokens but the attention mask has {ctx.mask.numel()}; "
                    "this layer's input is not laid out per token, so padding cannot be removed: "
                    "calibrate without padding (batch_size=1) or exclude this module"
                )
            mask, n_valid = None, tokens.shape[0]
        self.groups[group].add(tokens, mask, n_valid, ctx.n_sequences)
        ctx.seen[key] = (weakref.ref(x), x._version, group)


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Evaluation mode and no gradients inside; every module's train/eval flag restored after, also on error."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _accepts(model: nn.Module, argument: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return argument in params  # named explicitly: **kwargs may forward it somewhere that rejects it


def forward_kwargs(model: nn.Module, targets: Iterable[nn.Module] = ()) -> dict:
    """Arguments that skip work calibration does not need: the KV cache, and logits
    (only layer inputs are measured, so the LM head's vocabulary projection is wasted,
    unless the LM head is itself a target)."""
    extra = {}
    if _accepts(model, "use_cache"):
        extra["use_cache"] = False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if _accepts(model, "logits_to_keep") and not any(m is head for m in targets):
        extra["logits_to_keep"] = 1
    return extra


def prepare_batch(batch: Mapping[str, torch.Tensor], device: torch.device, index: int) -> tuple[dict, torch.Tensor | None]:
    """Move a batch to ``device`` and validate it; returns (model kwargs, attention mask)."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch and "inputs_embeds" not in batch:
        raise CalibrationError(f"batch {index} must be a mapping with 'input_ids' (and optionally 'attention_mask')")
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "labels"}
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.to(torch.bool).any()):
        raise CalibrationError(f"batch {index} is all padding (attention_mask is 0 everywhere); drop empty samples")
    return kwargs, mask


def calibrate(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    target_modules: str | Sequence[str] | None = None,
    hessian: str = "diag",
    backend: str | None = None,
    progress: bool = True,
) -> CalibrationStatistics:
    """Run ``batches`` through ``model`` once and return per-input-group statistics.

    The model's weights, dtype, device and train/eval mode are unchanged afterwards;
    hooks are removed also when an error is raised.
    """
    names = resolve_targets(model, target_modules)
    lookup = dict(model.named_modules())
    modules = {n: lookup[n] for n in names}
    dims = {n: module_dims(m) for n, m in modules.items()}
    device = model_device(model)
    extra = forward_kwargs(model, modules.values())
    seen_batches = 0
    with preserved_state(model), StatisticsHooks(modules, hessian, backend) as hooks:
        for index, batch in enumerate(progress_bar(batches, progress)):
            kwargs, mask = prepare_batch(batch, device, index)
            ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
            hooks.context.set(mask, int(ids.shape[0]), int(ids.shape[0] * ids.shape[1]))
            model(**kwargs, **extra)
            seen_batches += 1
    if seen_batches == 0:
        raise CalibrationError("no calibration batches were given; pass at least one batch of text")
    missing = [n for n in names if n not in hooks.module_group]
    if missing:
        raise CalibrationError(
            f"{len(missing)} target modules never ran in the forward pass (e.g. {missing[0]}); "
            "exclude them with target_modules"
        )
    for group in hooks.groups.values():  # members in model order
        group.members.sort(key=names.index)
    return hooks.result(dims)


def progress_bar(items: Iterable, enabled: bool, desc: str = "calibrating", unit: str = "batch") -> Iterable:
    """``items`` wrapped in a tqdm bar when ``enabled`` (any iterable, sized or not)."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    try:
        total = len(items)  # type: ignore[arg-type]
    except TypeError:  # generators, DataLoaders over iterable datasets
        total = None
    return tqdm(items, total=total, desc=desc, unit=unit)
