"""The TsqLoRA methods of `sensitivity-lora evaluate`: same steps and budget as uniform LoRA, costs recorded."""
from __future__ import annotations

import math

from conftest import tiny_llama
from sensitivity_lora.evaluation.finetune import TrainConfig
from sensitivity_lora.evaluation.methods import METHODS
from test_evaluation import _texts, one_thread, tiny_classification, tokenizer  # noqa: F401 (fixtures)

NAMES = ("uniform", "tsqlora", "tsqlora-sampling", "tsqlora-ranks")


def test_tsqlora_methods_on_a_causal_lm_keep_the_steps_and_the_rank_budget(tokenizer):
    from sensitivity_lora.evaluation.causal_lm import CausalLMTask, run_causal_lm

    model = tiny_llama(vocab=tokenizer.vocab_size)
    model.config.pad_token_id = tokenizer.pad_token_id
    task = CausalLMTask(n_train=12, n_eval=4, seq_len=20, n_calibration=8, calibration_batch_size=4)
    config = TrainConfig(steps=20, batch_size=4, lr=1e-3, warmup_steps=1, seed=0)
    runs = {m: run_causal_lm(model, tokenizer, _texts(30), METHODS[m], 3, 0, config, task) for m in NAMES}
    for name, r in runs.items():
        assert r["steps"] == 20 and r["rank_sum"] == 3 * 14, name
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1, name
    assert runs["tsqlora-ranks"]["plan_digest"] == runs["uniform"]["plan_digest"]  # the shared batch plan
    assert runs["tsqlora-sampling"]["plan_digest"] != runs["uniform"]["plan_digest"]  # rows drawn by quality
    assert runs["tsqlora-sampling"]["ranks"] == runs["uniform"]["ranks"]
    for name in ("tsqlora", "tsqlora-sampling"):
        assert runs[name]["refreshes"] == 10 and 0 < runs[name]["scoring_fraction"] < 1
    for name in ("tsqlora", "tsqlora-ranks"):
        assert runs[name]["n_distinct_ranks"] > 1 and "rank_changes" in runs[name]
    assert "refreshes" not in runs["uniform"]


def test_tsqlora_on_classification_uses_the_labelled_calibration(tokenizer):
    from sensitivity_lora.evaluation.classification import run_classification

    encoder, articles, task = tiny_classification(tokenizer)
    config = TrainConfig(steps=10, batch_size=4, lr=1e-3, warmup_steps=1, seed=0)
    record = run_classification(encoder, tokenizer, articles, METHODS["tsqlora"], 2, 0, config, task)
    assert 0 <= record["accuracy"] <= 1 and record["rank_sum"] == 24 and record["refreshes"] == 10
