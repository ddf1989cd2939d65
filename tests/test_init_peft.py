"""EVA from statistics against PEFT's own EVA on a tiny Llama, and our state dicts loaded by PEFT unchanged.

Measured here (PEFT 0.21.2, seed fixed, one CPU thread):
- one calibration batch (PEFT's PCA then sees exactly our tokens; its randomised SVD is the only
  approximation): every component |cos| ≥ 1 − 1e-10 *with the same sign* (PEFT's svd_flip is our
  sign convention); ranks equal for 12 of 14 modules, the 2 others swap one rank inside a q/k/v
  group at the budget cut (a tie: PEFT's unstable argsort, ours by model order), group sums equal;
- four batches (PEFT stops each layer once its components stop moving, on part of the data):
  ranks equal for 14/14 modules, mean |cos| 0.994 (min 0.97).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("peft")

import sensitivity_lora  # noqa: E402
from sensitivity_lora.init import (GroupSums, alpha_pattern, covariance_init, eva_init,  # noqa: E402
                                   group_sums_from_statistics, to_eva_state_dict)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def structured_llama(seed: int = 0, decay: float = 1.0):
    """A 2-layer Llama (hidden 64) whose weights have decaying singular values, so that layer inputs
    have a clear principal spectrum (random weights give near-isotropic inputs, where any PCA is noise)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                u, s, vh = torch.linalg.svd(p, full_matrices=False)
                s = s[0] * torch.arange(1, s.numel() + 1, dtype=s.dtype) ** -decay
                p.copy_((u * s) @ vh * (p.norm() / s.norm()))
    return model


def token_batches(n_batches: int, batch: int, seq: int = 64, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, 128, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[1, seq * 5 // 8:] = 0  # a padded row: excluded by both PEFT and the calibration
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def ours_and_peft(model, batches, r: int = 4, rho: float = 2.0):
    stats = sensitivity_lora.calibrate(model, batches, hessian="full", progress=False)
    order = list(stats.dims)
    ours = eva_init(group_sums_from_statistics(stats), r, rho, order=order)
    from peft import EvaConfig, LoraConfig, get_peft_model
    from peft.tuners.lora.eva import get_eva_state_dict

    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights="eva",
                        eva_config=EvaConfig(rho=rho, use_label_mask=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(model), config, low_cpu_mem_usage=True)
        theirs = get_eva_state_dict(peft_model, batches, show_progress_bar=False)
    return stats, ours, {k.removeprefix("base_model.model."): v for k, v in theirs.items()}


def agreement(ours, theirs, order):
    equal = sum(ours.ranks[m] == theirs[m].shape[0] for m in order) / len(order)
    cosines = []
    for m in order:
        k = min(ours.ranks[m], theirs[m].shape[0])
        cosines += (ours.components[m][:k] * theirs[m][:k].double()).sum(1).tolist()
    return equal, cosines


def test_equal_to_peft_eva_on_one_batch():
    torch.set_num_threads(1)
    stats, ours, theirs = ours_and_peft(structured_llama(), token_batches(1, 16))
    order = list(stats.dims)
    assert set(theirs) == set(order)
    equal, cosines = agreement(ours, theirs, order)
    assert min(cosines) > 1 - 1e-6  # signed: the same sign convention as PEFT's svd_flip
    assert all(t.dtype == torch.float64 for t in theirs.values())  # PEFT's format: fp64 rows
    for group in stats.groups.values():
        members = list(group.members)
        assert sorted(ours.ranks[m] for m in members) == sorted(theirs[m].shape[0] for m in members)
        # PEFT's rule: the group's first member holds the most; so does ours
        assert ours.ranks[members[0]] == theirs[members[0]].shape[0] == max(ours.ranks[m] for m in members)
    assert equal >= 10 / 14


def test_close_to_peft_eva_over_several_batches():
    torch.set_num_threads(1)
    stats, ours, theirs = ours_and_peft(structured_llama(), token_batches(4, 8))
    equal, cosines = agreement(ours, theirs, list(stats.dims))
    mean_cos = sum(abs(c) for c in cosines) / len(cosines)
    assert equal >= 0.85 and mean_cos >= 0.97, (equal, mean_cos)  # measured 1.0 and 0.994


def test_one_decomposition_per_input_group_on_a_model(monkeypatch):
    from sensitivity_lora.init import pca

    calls = []
    real = pca.top_eigenpairs_many
    monkeypatch.setattr(pca, "top_eigenpairs_many",
                        lambda ms, ks, method="auto", **kw: calls.extend(ks) or real(ms, ks, method))
    stats = sensitivity_lora.calibrate(structured_llama(), token_batches(1, 4), hessian="full", progress=False)
    result = eva_init(group_sums_from_statistics(stats), 4, 2.0, order=list(stats.dims))
    # Llama: q/k/v share an input, gate/up share one, o and down alone: 4 groups for 7 modules per layer
    assert len(stats.groups) == 8 and len(stats.dims) == 14
    assert len(calls) == result.decompositions == 8


def peft_model_for(model, r: int, alpha: float, rho: float = 2.0):
    from peft import EvaConfig, LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="eva",
                        eva_config=EvaConfig(rho=rho, use_label_mask=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(copy.deepcopy(model), config, low_cpu_mem_usage=True)


def check_loaded(peft_model, result, r: int, alpha: float, base_model, batch):
    """Every LoRA layer as the result says: rank, A (exactly), B = 0, α/r; rank 0: the plain base layer."""
    from peft.tuners.lora import LoraLayer

    modules = dict(peft_model.named_modules())
    config = peft_model.peft_config["default"]
    for name, rank in result.ranks.items():
        module = modules["base_model.model." + name]
        if rank == 0:
            assert isinstance(module, torch.nn.Linear) and not isinstance(module, LoraLayer)
            continue
        assert module.r["default"] == rank
        assert torch.equal(module.lora_A["default"].weight, result.components[name].float())
        assert torch.count_nonzero(module.lora_B["default"].weight) == 0
        assert module.scaling["default"] == pytest.approx(alpha / r)  # adjust_scaling_factors: α/r constant
    assert config.rank_pattern == {m: k for m, k in result.ranks.items() if k not in (0, r)}
    assert config.alpha_pattern == alpha_pattern(result.ranks, r, alpha)
    with torch.no_grad():  # B = 0: the adapted model computes what the base model does
        assert torch.allclose(peft_model(**batch).logits, base_model(**batch).logits, atol=1e-5)


def test_our_eva_state_dict_loads_into_peft_unchanged():
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    torch.set_num_threads(1)
    model = structured_llama()
    batches = token_batches(1, 8)
    stats = sensitivity_lora.calibrate(model, batches, hessian="full", progress=False)
    result = eva_init(group_sums_from_statistics(stats), 4, 4.0, order=list(stats.dims))
    peft_model = peft_model_for(model, 4, 8.0, rho=4.0)
    state = to_eva_state_dict(result)
    initialize_lora_eva_weights(peft_model, eva_state_dict=dict(state))
    check_loaded(peft_model, result, 4, 8.0, model, batches[0])


def test_any_initialiser_loads_the_same_way_including_rank_zero():
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    torch.set_num_threads(1)
    model = structured_llama(seed=3)
    batches = token_batches(1, 8)
    stats = sensitivity_lora.calibrate(model, batches, hessian="full", progress=False)
    order = list(stats.dims)
    ranks = {m: (i * 5) % 9 for i, m in enumerate(order)}  # 0..8, some modules without an adapter
    assert 0 in ranks.values()
    result = covariance_init(group_sums_from_statistics(stats), ranks, order=order)
    peft_model = peft_model_for(model, 4, 16.0)
    initialize_lora_eva_weights(peft_model, eva_state_dict=to_eva_state_dict(result))
    check_loaded(peft_model, result, 4, 16.0, model, batches[0])


def test_peft_ignores_a_state_dict_keyed_by_base_names():
    """Why to_eva_state_dict prefixes "base_model.model.": PEFT's loader matches the PeftModel's names."""
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    model = structured_llama()
    stats = sensitivity_lora.calibrate(model, token_batches(1, 4), hessian="full", progress=False)
    result = eva_init(group_sums_from_statistics(stats), 4, 2.0, order=list(stats.dims))
    peft_model = peft_model_for(model, 4, 8.0)
    with pytest.warns(UserWarning, match="not found in the eva state_dict"):
        initialize_lora_eva_weights(peft_model, eva_state_dict=to_eva_state_dict(result, prefix=""))


def test_group_sums_from_statistics_reads_full_mode_only():
    model = structured_llama()
    full = sensitivity_lora.calibrate(model, token_batches(1, 4), hessian="full", progress=False)
    sums = group_sums_from_statistics(full)
    assert list(sums) == list(full.groups)
    for name, group in full.groups.items():
        assert isinstance(sums[name], GroupSums) and sums[name].members == tuple(group.members)
        assert sums[name].n_tokens == group.n_tokens and torch.equal(sums[name].total, group.sum)
    diag = sensitivity_lora.calibrate(model, token_batches(1, 4), hessian="diag", progress=False)
    with pytest.raises(ValueError, match="hessian='full'"):
        group_sums_from_statistics(diag)


def test_batch_order_and_repeat_do_not_change_our_eva():
    """Unlike PEFT's incremental PCA, the sums do not depend on the batch order (beyond fp64 rounding)."""
    torch.set_num_threads(1)
    model = structured_llama()
    batches = token_batches(3, 4)
    results = []
    for order_of_batches in (batches, batches, batches[::-1]):
        stats = sensitivity_lora.calibrate(model, order_of_batches, hessian="full", progress=False)
        results.append(eva_init(group_sums_from_statistics(stats), 4, 2.0, order=list(stats.dims)))
    first, again, reversed_ = results
    assert first.ranks == again.ranks == reversed_.ranks
    for m, a in first.components.items():
        assert torch.equal(a, again.components[m])  # same inputs: same bytes
        assert torch.allclose(a, reversed_.components[m], atol=1e-6)  # same signs, fp32 activations summed in another order
