"""Hostile input through the Python API: every bad value is refused before any work, with an error naming it,
and the model is exactly as before (weights, dtypes, devices, flags, hooks, instance attributes) on every path."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import random_batches, tiny_bert, tiny_gpt2, tiny_llama
from model_snapshot import assert_unchanged, snapshot
from sensitivity_lora import compute_allocation, sensitivity_peft_model
from sensitivity_lora.calibration import streaming
from sensitivity_lora.calibration.one_pass import calibrate
from sensitivity_lora.errors import (BackendUnavailableError, CalibrationError, DataError, ModelError,
                                     RankMismatchError)

pytestmark = pytest.mark.filterwarnings("ignore:sensitivity_lora._C is not built")


class Counter:
    """A forward pre-hook that counts the model's forward passes (registered before the snapshot)."""

    def __init__(self, model):
        self.calls = 0
        model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1


@pytest.fixture
def model():
    return tiny_llama()


def refused(model, error, match, **kwargs):
    """``compute_allocation(model, ...)`` raises ``error`` matching ``match`` before any forward pass, and
    leaves the model as it was."""
    batches = kwargs.pop("batches", None) or random_batches(2)
    counter = Counter(model)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        compute_allocation(model, batches, progress=False, **kwargs)
    assert counter.calls == 0, "work was done before the bad input was refused"
    assert_unchanged(before, model)


# ---------------------------------------------------------------- devices and backends

@pytest.mark.parametrize("device, match", [
    ("gpu0", "not a device torch knows"),
    ("meta", "holds no data"),
    ("cuda:99", "CUDA|99"),
    (3.5, "must be a device name"),
    (True, "must be a device name"),
])
def test_bad_device_is_refused_before_any_work(model, device, match):
    refused(model, ValueError, match, device=device)


def test_bad_cache_device_is_refused(model):
    refused(model, ValueError, "cache_device='meta' holds no data", cache_device="meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of CUDA where there is none")
def test_cuda_without_cuda_is_refused(model):
    refused(model, ValueError, "CUDA is not available", device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend exists here")
def test_forced_unavailable_backend_is_refused_before_any_work(model):
    refused(model, BackendUnavailableError, "backend 'cuda' was requested", backend="cuda")


def test_meta_weights_are_refused(model):
    with torch.device("meta"):
        ghost = tiny_llama()
    with pytest.raises(ModelError, match="meta device"):
        compute_allocation(ghost, random_batches(1), progress=False)


# ---------------------------------------------------------------- numbers and settings

@pytest.mark.parametrize("avg_rank", [math.nan, math.inf, -1, 0, "8", True, None])
def test_bad_avg_rank_is_refused(model, avg_rank):
    refused(model, ValueError, "avg_rank must be a positive finite number", avg_rank=avg_rank)


@pytest.mark.parametrize("setting, value, match", [
    ("energy", math.nan, "energy"),
    ("topk", math.nan, "topk"),
    ("rho", math.nan, "rho"),
    ("r_min", 2.5, "r_min"),
    ("tiers", True, "tiers"),
    ("method", "best", "method='best' is unknown"),
])
def test_bad_setting_is_refused(model, setting, value, match):
    refused(model, ValueError, match, **{setting: value})


def test_unknown_setting_is_refused(model):
    refused(model, TypeError, "unknown allocation setting", avg_rank=4, alpha=0.5)


# ---------------------------------------------------------------- LoRA keywords (before calibration)

@pytest.mark.parametrize("lora_kwargs, lora_alpha, match", [
    ({"lora_dropuot": 0.1}, None, "not a LoraConfig field.*did you mean lora_dropout"),
    ({"r": 4}, None, "'r' cannot be given"),
    ({"bias": "sideways"}, None, "bias='sideways' is not a valid value"),
    ({"lora_dropout": 1.5}, None, r"lora_dropout=1.5 must lie in \[0, 1\)"),
    ({"use_dora": "yes"}, None, "use_dora='yes' is not a valid value"),
    ({"task_type": "NOPE"}, None, "Invalid task type"),
    ({}, math.nan, "lora_alpha must be a positive finite number"),
    ({}, -1.0, "lora_alpha must be a positive finite number"),
    ({}, "16", "lora_alpha must be a positive finite number"),
])
def test_bad_lora_arguments_are_refused_before_calibration(model, lora_kwargs, lora_alpha, match):
    counter = Counter(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        sensitivity_peft_model(model, random_batches(2), avg_rank=4, lora_alpha=lora_alpha, lora_kwargs=lora_kwargs,
                       progress=False)
    assert counter.calls == 0
    assert_unchanged(before, model)


# ---------------------------------------------------------------- batches

def _batch(ids, mask=None):
    return {"input_ids": ids, **({"attention_mask": mask} if mask is not None else {})}


@pytest.mark.parametrize("make_model, batch, error, match", [
    (tiny_llama, _batch(torch.full((2, 8), 128)), DataError, "token ids run from 128 to 128.*0..127"),
    (tiny_llama, _batch(torch.full((2, 8), -3)), DataError, "token ids run from -3"),
    (tiny_llama, _batch(torch.zeros(2, 8)), DataError, "dtype torch.float32; token ids must be integers"),
    (tiny_llama, _batch(torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 7, dtype=torch.long)), DataError,
     "attention_mask has shape"),
    (tiny_llama, _batch(torch.zeros(2, 8, dtype=torch.long), torch.full((2, 8), 2)), DataError,
     "values other than 0 and 1"),
    (tiny_llama, _batch(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)),
     CalibrationError, "all padding"),
    (tiny_llama, _batch(torch.zeros(1, 130, dtype=torch.long)), DataError, "130 tokens per row.*at most 128"),
    (tiny_gpt2, _batch(torch.zeros(1, 80, dtype=torch.long)), DataError, "80 tokens per row.*at most 64"),
    (tiny_bert, _batch(torch.zeros(1, 65, dtype=torch.long)), DataError, "65 tokens per row.*at most 64"),
    (tiny_llama, _batch([[1, 2, 3]]), DataError, "input_ids is list, not a tensor"),
    (tiny_llama, {"text": "hello"}, CalibrationError, "must be a mapping with 'input_ids'"),
])
@pytest.mark.parametrize("stream", [False, True], ids=["one-pass", "streaming"])
def test_bad_batch_is_refused_before_any_forward(make_model, batch, error, match, stream):
    model = make_model()
    refused(model, error, match, batches=random_batches(1) + [batch], streaming=stream)


def test_one_batch_instead_of_a_list_is_refused(model):
    counter = Counter(model)
    with pytest.raises(CalibrationError, match="not one batch: wrap it in a list"):
        compute_allocation(model, random_batches(1)[0], progress=False)
    assert counter.calls == 0


@pytest.mark.parametrize("stream", [False, True], ids=["one-pass", "streaming"])
def test_all_padding_rows_are_not_counted_as_sequences(model, stream):
    batch = random_batches(1, batch=4, pad=False)[0]
    batch["attention_mask"][2] = 0  # one row is all padding
    if stream:
        stats = next(iter(streaming.iter_block_statistics(model, [batch], progress=False))).stats
    else:
        stats = calibrate(model, [batch], progress=False)
    assert {g.n_sequences for g in stats.groups.values()} == {3}
    assert {g.n_tokens for g in stats.groups.values()} == {3 * 12}


# ---------------------------------------------------------------- the model on failure paths

@pytest.mark.parametrize("stream", [False, True], ids=["one-pass", "streaming"])
def test_failure_inside_calibration_leaves_the_model_as_it_was(model, monkeypatch, stream):
    model.train()  # a model in training mode, with a frozen layer and a user's hook: all of it must stay
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    model.model.layers[1].register_forward_hook(lambda *a: None)
    before = snapshot(model)
    from sensitivity_lora.calibration.statistics import GroupStatistics

    calls = {"n": 0}
    original = GroupStatistics.add

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return original(self, *args)

    monkeypatch.setattr(GroupStatistics, "add", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        compute_allocation(model, random_batches(2), progress=False, streaming=stream)
    assert_unchanged(before, model)


def _accelerate_like(block):
    """What accelerate's dispatch does: an instance-level forward wrapping the class's one."""
    original = block.forward

    def forward(*args, **kwargs):
        return original(*args, **kwargs)

    block.forward = forward
    return forward


def test_streaming_keeps_an_instance_forward_that_was_there(model):
    expected = compute_allocation(tiny_llama(), random_batches(2), avg_rank=4, progress=False)
    hooks = [_accelerate_like(block) for block in model.model.layers]
    before = snapshot(model)
    got = compute_allocation(model, random_batches(2), avg_rank=4, progress=False, streaming=True)
    assert_unchanged(before, model)
    assert [b.__dict__.get("forward") for b in model.model.layers] == hooks
    assert got.to_dict() == expected.to_dict()


def test_streaming_keeps_an_instance_forward_after_a_failure(model, monkeypatch):
    hooks = [_accelerate_like(block) for block in model.model.layers]
    before = snapshot(model)
    original = streaming._run_block

    def crashing(block, index, *args):
        if index == 1:
            raise KeyboardInterrupt  # an interruption no `except Exception` catches
        return original(block, index, *args)

    monkeypatch.setattr(streaming, "_run_block", crashing)
    with pytest.raises(KeyboardInterrupt):
        compute_allocation(model, random_batches(2), progress=False, streaming=True)
    assert [b.__dict__.get("forward") for b in model.model.layers] == hooks
    assert_unchanged(before, model)


def test_peft_verification_failure_restores_flags_and_layers(model, monkeypatch):
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)  # a mix of flags, as a user may set
    before = snapshot(model)
    import sensitivity_lora.peft as peft_integration

    def failing(*args, **kwargs):
        raise RankMismatchError("forced mismatch")

    monkeypatch.setattr(peft_integration, "verify_ranks", failing)
    with pytest.raises(RankMismatchError, match="forced mismatch"):
        sensitivity_peft_model(model, random_batches(2), avg_rank=4, progress=False)
    assert_unchanged(before, model)  # no LoRA layer left, every requires_grad flag as it was


def test_initial_weight_failure_restores_the_model(model, monkeypatch):
    before = snapshot(model)
    import sensitivity_lora.peft as peft_integration

    def failing(*args, **kwargs):
        raise RankMismatchError("initial weights do not fit")

    monkeypatch.setattr(peft_integration, "apply_initial_weights", failing)
    with pytest.raises(RankMismatchError, match="do not fit"):
        sensitivity_peft_model(model, random_batches(2), avg_rank=4, init="covariance", progress=False)
    assert_unchanged(before, model)


def test_successful_sensitivity_peft_model_still_adapts(model):
    peft_model, allocation = sensitivity_peft_model(model, random_batches(2), avg_rank=4, progress=False)
    assert sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A")) == len(allocation.modules)


@pytest.mark.parametrize("how", ["peft_model", "injected"])
def test_a_model_that_already_holds_lora_adapters_is_refused(how):
    import peft

    base = tiny_llama()
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(base, config) if how == "peft_model" else peft.inject_adapter_in_model(config, base)
    counter = Counter(model)
    before = snapshot(model)
    with pytest.raises(ModelError, match="already holds LoRA adapters.*merge_and_unload"):
        compute_allocation(model, random_batches(2), progress=False)
    assert counter.calls == 0
    assert_unchanged(before, model)


def test_export_with_a_bad_device_touches_nothing(model, tmp_path):
    from sensitivity_lora import export_hessians

    before = snapshot(model)
    with pytest.raises(ValueError, match="not a device torch knows"):
        export_hessians(model, random_batches(1), tmp_path / "h", device="gpu0", progress=False)
    assert not (tmp_path / "h").exists()
    assert_unchanged(before, model)
