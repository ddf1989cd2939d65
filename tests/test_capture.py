"""Capture: targets, shared-input groups, padding masks, model left unchanged, errors."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import random_batches, tiny_bert, tiny_gpt2, tiny_llama
from sensitivity_lora.calibration.one_pass import calibrate
from sensitivity_lora.errors import CalibrationError, TargetError
from sensitivity_lora.calibration.targets import block_containers, resolve_targets


def _groups(stats) -> list[list[str]]:
    return [sorted(n.split(".", 3)[-1] for n in g.members) for g in stats.groups.values()]


def test_llama_groups_share_qkv_and_gate_up():
    stats = calibrate(tiny_llama(), random_batches(1), progress=False)
    assert len(stats.dims) == 14 and len(stats.groups) == 8
    layer0 = [sorted(m.rsplit(".", 1)[-1] for m in g.members) for g in stats.groups.values()][:4]
    assert layer0 == [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def test_bert_groups_share_query_key_value():
    stats = calibrate(tiny_bert(), random_batches(1), progress=False)
    assert len(stats.dims) == 12 and len(stats.groups) == 8
    first = next(iter(stats.groups.values())).members
    assert [m.rsplit(".", 1)[-1] for m in first] == ["query", "key", "value"]


def test_gpt2_conv1d_targets_have_no_sharing():
    model = tiny_gpt2()
    stats = calibrate(model, random_batches(1), progress=False)
    assert len(stats.dims) == 8 and len(stats.groups) == 8
    assert stats.dims["transformer.h.0.attn.c_attn"] == (32, 96)
    assert stats.dims["transformer.h.0.mlp.c_proj"] == (128, 32)
    assert "lm_head" not in stats.dims


def test_default_targets_exclude_heads_and_find_blocks():
    model = tiny_llama()
    assert block_containers(model) == ["model.layers"]
    names = resolve_targets(model)
    assert "lm_head" not in names and all(n.startswith("model.layers.") for n in names)


def test_target_selection_by_names_and_regex():
    model = tiny_llama()
    by_name = resolve_targets(model, ["q_proj", "v_proj"])
    assert by_name == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert resolve_targets(model, r".*\.1\.mlp\.(up|down)_proj") == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(TargetError, match="no linear layer matches"):
        resolve_targets(model, ["nope"])
    with pytest.raises(TargetError, match="invalid"):
        resolve_targets(model, "([")


def _oracle_sumsq(model, batches, names):
    """Σ x² over non-padding tokens, in fp64, from inputs stored by plain hooks."""
    sums = {n: 0.0 for n in names}
    mods = dict(model.named_modules())
    current = {}

    def make(n):
        def hook(_m, args):
            x = args[0].double()
            m = current["mask"].bool()
            sums[n] = sums[n] + x[m].square().sum(0)
        return hook

    handles = [mods[n].register_forward_pre_hook(make(n)) for n in names]
    with torch.no_grad():
        for b in batches:
            current["mask"] = b["attention_mask"]
            model(**b)
    for h in handles:
        h.remove()
    return sums


@pytest.mark.parametrize("factory", [tiny_llama, tiny_bert, tiny_gpt2])
def test_statistics_match_fp64_oracle_with_padding(factory):
    model = factory()
    batches = random_batches(3)
    stats = calibrate(model, batches, progress=False)
    oracle = _oracle_sumsq(model, batches, list(stats.dims))
    n_valid = sum(int(b["attention_mask"].sum()) for b in batches)
    for group, g in stats.groups.items():
        assert g.n_tokens == n_valid and g.n_sequences == 12
        torch.testing.assert_close(g.sumsq, oracle[group], rtol=1e-5, atol=1e-8)


def test_padding_is_excluded_exactly():
    """A right-padded batch gives the statistics of its rows run one by one without padding."""
    model = tiny_llama()
    (batch,) = random_batches(1, batch=4, seq=10)
    padded = calibrate(model, [batch], progress=False)
    rows = []
    for i in range(4):
        n = int(batch["attention_mask"][i].sum())
        rows.append({"input_ids": batch["input_ids"][i : i + 1, :n], "attention_mask": torch.ones(1, n, dtype=torch.long)})
    unpadded = calibrate(model, rows, progress=False)
    for g in padded.groups:
        torch.testing.assert_close(padded.groups[g].sumsq, unpadded.groups[g].sumsq, rtol=1e-5, atol=1e-7)
        assert padded.groups[g].n_tokens == unpadded.groups[g].n_tokens


def test_model_unchanged_and_hooks_removed():
    model = tiny_llama().train()
    model.model.layers[1].eval()  # a mixed mode must survive too
    before = copy.deepcopy(model.state_dict())
    modes = {n: m.training for n, m in model.named_modules()}
    calibrate(model, random_batches(2), hessian="full", progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert next(model.parameters()).dtype == torch.float32


def test_deterministic():
    model = tiny_llama()
    a = calibrate(model, random_batches(2), hessian="full", progress=False)
    b = calibrate(model, random_batches(2), hessian="full", progress=False)
    for g in a.groups:
        assert torch.equal(a.groups[g].sumsq, b.groups[g].sumsq)
        assert torch.equal(a.groups[g].raw_xtx(), b.groups[g].raw_xtx())


def test_nonfinite_activations_raise_and_leave_model_unchanged():
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("nan")
    batches = random_batches(1)
    batches[0]["input_ids"][0, 0] = 5
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CalibrationError, match="non-finite"):
        calibrate(model, batches, progress=False)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], equal_nan=True, rtol=0, atol=0)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_empty_and_all_padding_data_raise():
    model = tiny_llama()
    with pytest.raises(CalibrationError, match="no calibration batches"):
        calibrate(model, [], progress=False)
    batch = random_batches(1)[0]
    batch["attention_mask"].zero_()
    with pytest.raises(CalibrationError, match="all padding"):
        calibrate(model, [batch], progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(CalibrationError, match="input_ids"):
        calibrate(model, [{"ids": torch.zeros(1, 3)}], progress=False)


def test_lm_head_as_explicit_target_sees_every_token():
    """Logits are skipped during calibration only when the LM head is not a target."""
    model = tiny_llama()
    batches = random_batches(2)
    stats = calibrate(model, batches, target_modules=["lm_head", "q_proj"], progress=False)
    assert "lm_head" in stats.dims
    oracle = _oracle_sumsq(model, batches, ["lm_head"])
    torch.testing.assert_close(stats.groups[stats.module_group["lm_head"]].sumsq, oracle["lm_head"], rtol=1e-5, atol=1e-8)


def test_progress_bar_accepts_unsized_data():
    from torch.utils.data import DataLoader, IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            yield from random_batches(2)

    stats = calibrate(tiny_llama(), DataLoader(Stream(), batch_size=None), progress=True)
    assert len(stats.groups) == 8


def test_unknown_devices_use_the_reference_ops():
    from sensitivity_lora import ops

    assert ops.resolve_backend("accumulate_sumsq", torch.device("meta")) == "reference"


def test_the_finite_check_of_full_statistics_reads_the_diagonal_and_catches_overflow():
    from sensitivity_lora.calibration.statistics import GroupStatistics

    group = GroupStatistics("g", ["g"], 4, "full")
    x = torch.randn(6, 4)
    group.add(x, None, 6, 1)
    group.check_finite()  # finite sums pass
    big = torch.zeros(2, 4)
    big[:, 1], big[:, 2] = 3e19, 3e19  # x₁x₂ overflows fp32 products, and so does x₁² on the diagonal
    overflowed = GroupStatistics("h", ["h"], 4, "full", backend="reference")
    overflowed.add(big, None, 2, 1)
    overflowed.sumsq.zero_()  # leave only Σxxᵀ to tell
    assert not torch.isfinite(overflowed.xtx[1, 2]) or not torch.isfinite(overflowed.xtx[2, 1])
    with pytest.raises(CalibrationError, match="non-finite"):
        overflowed.check_finite()
