"""From HyperAdaLoRA to a plain PEFT LoRA adapter: the pruned P Λ Q materialised as A and B.

For a module keeping triplets K, LoRA's update (alpha_w / r_w) · B A equals HyperAdaLoRA's
P_K diag(Λ_K) Q_K · alpha / init_rank when A = Q_K and B = P_K diag(Λ_K) · s_h / s_e, with
s_h = alpha / init_rank and s_e the exported layer's own scale (``lora_config_from_ranks``
keeps alpha_w / r_w = alpha / r̄ in every module, so the step size matches uniform LoRA's).
Modules that keep no triplet get no adapter. The result needs only PEFT to load.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch

from ..files import check_path
from ..folders import write_folder_whole
from ..peft import ADAPTER_FILES, check_lora_kwargs, lora_config_from_ranks, lora_layers, pattern_key
from ..settings import check_adapter_name, check_flag
from .model import HyperAdaLoraModel


def _check_final(model: HyperAdaLoraModel) -> dict[str, int]:
    ranks, config = model.ranks(), model.hyper_config
    if not model.allocator.final:
        raise ValueError("the final rank budget is not in force yet (training stopped before step "
                         f"total_steps − tfinal = {config.total_steps - config.tfinal}): train to the "
                         "end of the schedule or call model.finalize_ranks() first")
    if sum(ranks.values()) != model.allocator.target_budget:  # pragma: no cover - the allocator guarantees it
        raise ValueError(f"the masks keep {sum(ranks.values())} triplets, "
                         f"the budget is {model.allocator.target_budget}")
    return ranks


@torch.no_grad()
def lora_factors(model: HyperAdaLoraModel, scales: dict[str, float]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A, B)}`` for every module that keeps a triplet, for exported layer scales ``scales``."""
    was_training = model.training
    model.eval()
    try:
        generated = model.generate_updates()
    finally:
        model.train(was_training)
    out = {}
    for name, layer in model.layers().items():
        kept = layer.mask.nonzero().flatten()
        if kept.numel() == 0:
            continue
        p, lam, q = generated[name]
        factor = lam[kept] * (model.hyper_config.scale / scales[name])
        out[name] = (q[kept].clone(), p[:, kept] * factor)
    return out


def to_peft_model(model: HyperAdaLoraModel, inplace: bool = False, adapter_name: str = "default",
                  **lora_kwargs: Any):
    """A ``PeftModel`` with plain LoRA layers computing what ``model`` computes.

    ``inplace=False`` (the default) leaves ``model`` working and exports from a copy; with
    ``inplace=True`` the base model is unwrapped and reused (less memory; ``model`` is spent).
    ``lora_kwargs`` go to ``LoraConfig`` (``task_type``, ``modules_to_save``, ...).
    """
    from peft import get_peft_model

    if not isinstance(model, HyperAdaLoraModel):
        raise ValueError(f"model must be a HyperAdaLoraModel, got {type(model).__name__}")
    check_flag("inplace", inplace)
    check_adapter_name(adapter_name)
    check_lora_kwargs(lora_kwargs)  # before the model's state is touched
    ranks = _check_final(model)
    model.release_updates()  # the last training forward's tensors belong to a graph: they cannot be copied
    if not inplace:
        model = copy.deepcopy(model)
    config = lora_config_from_ranks(ranks, model.hyper_config.avg_rank, model.hyper_config.alpha,
                                    lora_dropout=model.hyper_config.lora_dropout, **lora_kwargs)
    factors = lora_factors(model, _exported_scales(config, ranks))
    base = model.unload()  # the copy's (or, in place, the model's own) base model with its linears back
    try:
        peft_model = get_peft_model(base, config, adapter_name=adapter_name)
        _copy_factors(peft_model, factors, adapter_name)
    except Exception as exc:
        if inplace:
            raise RuntimeError(f"export failed after the model was unwrapped ({exc}); the HyperAdaLoRA model "
                               "is spent: export with inplace=False to keep it") from exc
        raise
    return peft_model


def _exported_scales(config: Any, ranks: dict[str, int]) -> dict[str, float]:
    """alpha_w / r_w (or / √r_w with rsLoRA) of every exported module, as PEFT will set it."""
    scales = {}
    for name, r in ranks.items():
        if r == 0:
            continue
        key = pattern_key(config.alpha_pattern or {}, name)
        alpha = config.alpha_pattern[key] if key is not None else config.lora_alpha
        scales[name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    return scales


def _copy_factors(peft_model: Any, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], adapter_name: str) -> None:
    done = set()
    with torch.no_grad():
        for _, target, layer in lora_layers(peft_model, set(factors), adapter_name):
            if target is None:
                continue
            a, b = factors[target]
            weight_a, weight_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            if tuple(weight_a.shape) != tuple(a.shape) or tuple(weight_b.shape) != tuple(b.shape):
                raise ValueError(f"{target}: PEFT built A {tuple(weight_a.shape)}, B {tuple(weight_b.shape)}; "
                                 f"the export has {tuple(a.shape)}, {tuple(b.shape)}")
            weight_a.copy_(a.to(weight_a))
            weight_b.copy_(b.to(weight_b))
            done.add(target)
    missing = sorted(set(factors) - done)
    if missing:
        raise ValueError(f"PEFT built no LoRA layer for {len(missing)} exported modules (e.g. {missing[0]})")


def save_lora_adapter(model: HyperAdaLoraModel, folder: str | Path, **lora_kwargs: Any) -> Path:
    """Write ``model`` as a PEFT LoRA adapter folder (``adapter_config.json`` + safetensors) and return it.

    ``PeftModel.from_pretrained(base_model, folder)`` then loads it without this package.
    """
    check_path("folder", folder)
    peft_model = to_peft_model(model, inplace=False, **lora_kwargs)
    return write_folder_whole(folder, lambda staging: peft_model.save_pretrained(str(staging)), ADAPTER_FILES)
