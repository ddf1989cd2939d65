"""Budgets of an adapted model, read off the model itself (not taken on trust from a config).

Two budgets matter: the rank budget Σ r_w (what Sensitivity-LoRA's default
``budget_mode="rank"``, EVA and AdaLoRA hold fixed) and the LoRA parameter count
Σ r_w (d_in + d_out) (what ``budget_mode="params"`` holds fixed). With
non-uniform ranks the two differ, so every result reports both.
"""
from __future__ import annotations

from torch import nn

from ..calibration.targets import module_dims
from ..peft import base_module_name, lora_layers


def adapter_ranks(peft_model: nn.Module, targets: list[str], adapter_name: str = "default") -> dict[str, int]:
    """The effective rank of every target's LoRA layer, in ``targets`` order.

    For AdaLoRA the rank is the number of singular values its final mask keeps
    (``rank_pattern``); before the mask exists it is the initial rank. A target
    without a LoRA layer (EVA can give a module no rank at all) has rank 0.
    """
    wanted = set(targets)
    pattern = _adalora_pattern(peft_model, adapter_name)
    found: dict[str, int] = {}
    for _, target, module in lora_layers(peft_model, wanted, adapter_name):
        if target is None:
            continue
        rank = int(module.r[adapter_name])
        if pattern is not None:
            mask = next((m for key, m in pattern.items()
                         if base_module_name(_mask_owner(key, adapter_name), wanted) == target), None)
            if mask is not None:
                rank = int(sum(bool(x) for x in mask))
        found[target] = rank
    if not found:
        raise ValueError("the model has no LoRA layer on any target module: was the adapter built?")
    # a target without a LoRA layer has rank 0: EVA drops modules whose share of the budget is zero
    return {t: found.get(t, 0) for t in targets}


def _mask_owner(key: str, adapter_name: str) -> str:
    """The module a rank_pattern key (``<module>.lora_E[.<adapter>]``) belongs to."""
    for suffix in (f".lora_E.{adapter_name}", ".lora_E"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def _adalora_pattern(peft_model: nn.Module, adapter_name: str) -> dict | None:
    config = getattr(peft_model, "peft_config", {}).get(adapter_name)
    if config is None or type(config).__name__ != "AdaLoraConfig":
        return None
    return config.rank_pattern or None


def target_dims(model: nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each target, found by name in ``model`` or in a PEFT wrapper of it."""
    wanted = set(targets)
    dims: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        target = base_module_name(name, wanted)
        if target is None or target in dims:
            continue
        base = getattr(module, "base_layer", module)  # a LoRA-wrapped layer keeps the original inside
        try:
            dims[target] = module_dims(base)
        except ValueError:
            continue
    missing = [t for t in targets if t not in dims]
    if missing:
        raise ValueError(f"{len(missing)} targets are not linear layers of the model (first: {missing[0]})")
    return dims


def lora_params(ranks: dict[str, int], dims: dict[str, tuple[int, int]]) -> int:
    """Σ r_w (d_in + d_out): the parameters of the A and B matrices."""
    return sum(r * (dims[n][0] + dims[n][1]) for n, r in ranks.items())


def budget_summary(ranks: dict[str, int], dims: dict[str, tuple[int, int]]) -> dict[str, float | int]:
    """Rank sum, LoRA parameter count, and how far the ranks are from uniform."""
    values = list(ranks.values())
    return {
        "n_modules": len(values),
        "rank_sum": sum(values),
        "lora_params": lora_params(ranks, dims),
        "rank_min": min(values),
        "rank_max": max(values),
        "n_distinct_ranks": len(set(values)),
    }
