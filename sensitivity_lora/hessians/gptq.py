"""Hessians in the form GPTQ tools keep them: one fp32 matrix per module, in each tool's normalisation.

    from sensitivity_lora.hessians.gptq import gptq_hessians, sample_counts
    H = gptq_hessians("hessians/", "llm-compressor", model=peft_model)   # {module name: (d_in, d_in) fp32}
    n = sample_counts("hessians/", "llm-compressor", model=peft_model)   # {module name: the tool's nsamples}

The package keeps one raw fp64 Σxxᵀ per input group (q/k/v share one, gate/up share one) and the
token and sequence counts; each tool wants its own copy per module (their GPTQ solvers damp and
factorise the matrix in place, so members never share storage here) and its own normalisation:

| tool                      | H                         | nsamples    | where it is stated |
|---------------------------|---------------------------|-------------|--------------------|
| llm-compressor 0.14       | 2/sequences · Σ x xᵀ, fp32 | sequences   | ``llmcompressor/modifiers/gptq/helpers.py``: ``accumulate_hessian`` adds 2·xxᵀ over every token and counts batch rows; ``prepare_batch`` divides by the count |
| GPTQModel                 | 2/tokens · Σ x xᵀ, fp32    | tokens      | ModelCloud/GPTQModel ``gptqmodel/quantization/gptq.py`` (commit 00e0b834), ``GPTQ.process_batch``: H ← H·n/(n+b) + 2/(n+b)·XᵀX with b the batch's tokens, n += b |
| reference GPTQ            | 2/sequences · Σ x xᵀ, fp32 | sequences   | IST-DASLab/gptq ``gptq.py``, ``GPTQ.add_batch``: H ← H·n/(n+b) + 2/(n+b)·XᵀX with b the batch's rows |

All three count padding tokens as inputs (they see no attention mask); the package drops them, so
the numbers agree for unpadded batches (batch size 1, or packed sequences), and differ otherwise by
exactly the padded positions' outer products. ``source`` is an export folder, the dict of
:func:`~sensitivity_lora.hessians.load_hessians`, a ``CalibrationStatistics`` or a mapping of
``GroupStatistics`` (in-memory, e.g. from ``iter_block_statistics``). Names: ``prefix`` is put in
front of every module name; ``model`` maps each name to the module of that model it denotes (one
name must be a dotted suffix of the other, so exports from a bare model fit a PEFT-wrapped one,
``base_model.model.`` and ``.base_layer`` included, and the other way round).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..calibration.statistics import CalibrationStatistics, GroupStatistics, normalisation_factor
from ..calibration.targets import LINEAR_TYPES
from ..errors import TargetError


@dataclass(frozen=True)
class ToolConvention:
    """How one tool normalises H and what its ``nsamples`` counts."""

    normalisation: str  # a key of calibration.statistics.NORMALISATIONS
    counts: str  # "sequences" or "tokens"


TOOLS = {
    "llm-compressor": ToolConvention("2/sequences", "sequences"),
    "gptqmodel": ToolConvention("2/tokens", "tokens"),
    "gptq": ToolConvention("2/sequences", "sequences"),
}


@dataclass
class _Group:
    members: list[str]
    xtx: torch.Tensor  # raw fp64 Σ x xᵀ
    n_tokens: int
    n_sequences: int


def _tool(tool: str) -> ToolConvention:
    if tool not in TOOLS:
        raise ValueError(f"unknown GPTQ tool {tool!r}; choose from {', '.join(TOOLS)}")
    return TOOLS[tool]


def _groups(source: Any) -> list[_Group]:
    """The distinct input groups of ``source`` (see the module docstring for what it may be)."""
    if isinstance(source, (str, os.PathLike)):
        from .format import load_hessians

        source = load_hessians(source, by="group")
    if isinstance(source, CalibrationStatistics):
        source = source.groups
    if not isinstance(source, Mapping):
        raise TypeError("source must be an export folder, load_hessians' dict, CalibrationStatistics or a mapping of "
                        f"GroupStatistics, not {type(source).__name__}")
    out, seen = [], set()
    for value in source.values():  # by-module dicts repeat one object per member: keep each once
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, GroupStatistics):
            xtx = value.raw_xtx()
        elif hasattr(value, "raw_xtx") and hasattr(value, "members"):  # a HessianFile
            if value.raw_xtx is None:
                raise ValueError(f"{value.group}: the file holds only the diagonal; export with hessian='full'")
            xtx = value.raw_xtx
        else:
            raise TypeError(f"cannot read Hessians from a {type(value).__name__}")
        out.append(_Group(list(value.members), xtx, value.n_tokens, value.n_sequences))
    return out


def _renamer(model: nn.Module | None, prefix: str):
    """Stored name → the caller's name (``prefix`` + name, or the module of ``model`` it denotes)."""
    if model is None:
        return lambda name: prefix + name
    linears = [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)]
    keys = {n: n[: -len(".base_layer")] if n.endswith(".base_layer") else n for n in linears}

    def rename(name: str) -> str:
        name = prefix + name
        hits = [n for n, k in keys.items() if k == name or k.endswith("." + name) or name.endswith("." + k)]
        if len(hits) > 1:  # an exact match wins over suffix matches
            hits = [n for n in hits if keys[n] == name] or hits
        if len(hits) != 1:
            raise TargetError(f"module {name} of the Hessians " + (
                f"matches several linear layers of the model ({', '.join(hits[:4])}); pass prefix= to say which"
                if hits else "matches no linear layer of the model; is it the model the Hessians were computed on?"))
        return hits[0]

    return rename


def gptq_hessians(source: Any, tool: str = "llm-compressor", *, model: nn.Module | None = None, prefix: str = "",
                  modules: Iterable[str] | None = None, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``{module name: H}`` in ``tool``'s convention (``TOOLS``): one (d_in, d_in) matrix per module, fp32 by
    default, never shared between modules. ``modules``: only these (names as returned)."""
    convention = _tool(tool)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype (torch.float32, torch.float64, ...), got {dtype!r}: "
                         "an integer or boolean Hessian would be truncated")
    rename, wanted = _renamer(model, prefix), set(modules) if modules is not None else None
    out: dict[str, torch.Tensor] = {}
    for group in _groups(source):
        factor = normalisation_factor(convention.normalisation, group.n_tokens, group.n_sequences)
        names = [n for n in map(rename, group.members) if wanted is None or n in wanted]
        if not names:
            continue
        h = (group.xtx * factor).to(device=device, dtype=dtype)  # scaled in fp64, rounded once
        for i, name in enumerate(names):
            out[name] = h if i == len(names) - 1 else h.clone()
    if wanted is not None and wanted - set(out):
        raise TargetError(f"no Hessian for {', '.join(sorted(wanted - set(out))[:4])}")
    return out


def sample_counts(source: Any, tool: str = "llm-compressor", *, model: nn.Module | None = None,
                  prefix: str = "") -> dict[str, int]:
    """``{module name: nsamples}`` as ``tool`` counts them (sequences or tokens; padding excluded here)."""
    convention, rename = _tool(tool), _renamer(model, prefix)
    return {rename(m): (g.n_sequences if convention.counts == "sequences" else g.n_tokens)
            for g in _groups(source) for m in g.members}
