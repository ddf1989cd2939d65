"""PEFT: config keys, alpha scaling, verification, the one-call helper."""
from __future__ import annotations

import re

import pytest
import torch

from conftest import random_batches, tiny_bert, tiny_gpt2, tiny_llama
from sensitivity_lora import compute_allocation, lora_config, sensitivity_peft_model, verify_ranks
from sensitivity_lora.errors import RankMismatchError


def _allocation(model, **kw):
    return compute_allocation(model, random_batches(2), avg_rank=4, progress=False, **kw)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_bert, tiny_gpt2])
def test_peft_model_gets_exactly_the_allocated_ranks(factory):
    model = factory()
    allocation = _allocation(model, r_min=1, rho=4.0)
    assert len(set(allocation.ranks().values())) > 1, "the test needs non-uniform ranks"
    peft_model, got = sensitivity_peft_model(factory(), random_batches(2), avg_rank=4, progress=False)
    assert got.ranks() == allocation.ranks()
    from peft.tuners.lora import LoraLayer

    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == len(allocation.modules)
    for name, module in layers.items():
        target = next(t for t in allocation.modules if name.endswith(t))
        assert module.r["default"] == allocation.modules[target].rank
        # alpha_w / r_w is the same for every module: lora_alpha / avg_rank (default lora_alpha = 2 r̄)
        assert module.scaling["default"] == pytest.approx(2.0)


def test_config_keys_are_full_escaped_paths_and_alpha_keeps_the_scale():
    model = tiny_llama()
    allocation = _allocation(model)
    config = lora_config(allocation, lora_alpha=12, lora_dropout=0.1)
    assert config.lora_dropout == 0.1
    for name, r in allocation.ranks().items():
        key = re.escape(name)
        assert config.rank_pattern[key] == r
        assert config.alpha_pattern[key] == pytest.approx(12 * r / 4)
    # layer 1's keys must not match layer 11-style names (escaped dots, full paths)
    assert not re.fullmatch(re.escape("model.layers.1.mlp.up_proj"), "model.layers.11.mlp.up_proj")
    with pytest.raises(ValueError, match="the allocation sets it"):
        lora_config(allocation, r=8)


def test_verify_ranks_catches_a_mismatch():
    from peft import get_peft_model as peft_get

    model = tiny_llama()
    allocation = _allocation(model)
    config = lora_config(allocation)
    name = next(iter(allocation.ranks()))
    config.rank_pattern[re.escape(name)] = allocation.ranks()[name] + 1  # what a silently ignored key looks like
    peft_model = peft_get(model, config)
    with pytest.raises(RankMismatchError, match=re.escape(name)):
        verify_ranks(peft_model, allocation)


def test_model_weights_unchanged_by_allocation():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _allocation(model, hessian="full", scope="eigen")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rslora_keeps_the_scale_equal_and_verify_checks_scales():
    from peft import get_peft_model as peft_get

    model = tiny_llama()
    allocation = _allocation(model)
    peft_model = peft_get(model, lora_config(allocation, lora_alpha=8, use_rslora=True))
    verify_ranks(peft_model, allocation)  # equal alpha_w / sqrt(r_w) everywhere
    from peft.tuners.lora import LoraLayer

    scales = {round(m.scaling["default"], 9) for m in peft_model.modules() if isinstance(m, LoraLayer)}
    assert scales == {round(8 / 4**0.5, 9)}
    config = lora_config(allocation, lora_alpha=8)
    config.use_rslora = True  # alpha_pattern computed for alpha/r, used with alpha/sqrt(r): scales differ
    with pytest.raises(RankMismatchError, match="scales differ"):
        verify_ranks(peft_get(tiny_llama(), config), allocation)


def test_bad_lora_kwargs_fail_before_calibration_and_failures_leave_model_clean(monkeypatch):
    model = tiny_llama()
    with pytest.raises(ValueError, match="lora_alpha"):
        sensitivity_peft_model(model, [], avg_rank=4, lora_kwargs={"lora_alpha": 16})  # [] would fail calibration
    import sensitivity_lora.peft as pi

    def refuse(*args, **kwargs):
        raise RankMismatchError("forced")

    monkeypatch.setattr(pi, "verify_ranks", refuse)
    with pytest.raises(RankMismatchError):
        sensitivity_peft_model(model, random_batches(1), avg_rank=4, progress=False)
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in model.modules())


def test_lora_config_from_ranks_skips_rank_zero_keeps_the_scale_and_rejects_bad_ranks():
    from peft import get_peft_model as peft_get_peft_model

    from sensitivity_lora.peft import lora_config_from_ranks

    model = tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    ranks = {name: (0 if i == 0 else 1 + i % 5) for i, name in enumerate(names)}
    config = lora_config_from_ranks(ranks, avg_rank=3, lora_alpha=6.0)
    assert names[0] not in config.target_modules and len(config.target_modules) == len(names) - 1
    peft_model = peft_get_peft_model(model, config)
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            r = module.lora_A["default"].out_features
            assert ranks[name.split("base_model.model.", 1)[-1]] == r
            assert module.scaling["default"] == pytest.approx(2.0)  # 6 / 3 for every rank
    with pytest.raises(ValueError, match="non-negative integers"):
        lora_config_from_ranks({names[0]: 1.5}, avg_rank=2)
    with pytest.raises(ValueError, match="nothing to adapt"):
        lora_config_from_ranks({names[0]: 0}, avg_rank=2)


def test_the_old_name_warns_and_gives_the_same_adapter():
    import sensitivity_lora

    with pytest.warns(FutureWarning, match="renamed sensitivity_peft_model"):
        _, old = sensitivity_lora.get_peft_model(tiny_llama(), random_batches(2), avg_rank=4, progress=False)
    _, new = sensitivity_peft_model(tiny_llama(), random_batches(2), avg_rank=4, progress=False)
    assert old.to_dict() == new.to_dict()
