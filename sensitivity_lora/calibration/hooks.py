"""Forward hooks that feed layer inputs to the statistics, with input groups and padding masks.

Modules that read the very same input tensor (q/k/v, gate/up, BERT query/key/value)
are found at run time by tensor identity, not from a table of names, and share one
accumulator: the statistic is computed once per distinct input.
"""
from __future__ import annotations

import weakref
from typing import Mapping

import torch
from torch import nn

from ..errors import CalibrationError
from .statistics import CalibrationStatistics, GroupStatistics


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
        """The finalised statistics of the modules in ``dims`` (model order): each group's members in that
        order, every sum checked to be finite."""
        missing = [n for n in dims if n not in self.module_group]
        if missing:
            raise CalibrationError(
                f"{len(missing)} target modules never ran in the forward pass (e.g. {missing[0]}); "
                "exclude them with target_modules"
            )
        order = {name: i for i, name in enumerate(dims)}
        for group in self.groups.values():
            group.members.sort(key=order.__getitem__)
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
