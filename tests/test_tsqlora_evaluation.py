"""The TsqLoRA methods of `sensitivity-lora evaluate`: same steps and budget as uniform LoRA, costs recorded."""
from __future__ import annotations

import math

from conftest import random_batches, tiny_llama
from sensitivity_lora.evaluation.finetune import TrainConfig
from sensitivity_lora.evaluation.methods import METHODS
from test_evaluation import _texts, tiny_classification, tokenizer  # noqa: F401 (fixtures)

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


def test_the_sharpness_variants_set_the_effective_sample_size(tokenizer):
    from sensitivity_lora.evaluation.classification import run_classification
    from sensitivity_lora.evaluation.methods import build_adapted

    for name, target in (("tsqlora-sampling-ess25", 0.25), ("tsqlora-sampling-ess90", 0.9),
                         ("tsqlora-sampling", 0.5)):
        adapted = build_adapted(tiny_llama(), METHODS[name], 2, random_batches(2), total_steps=20,
                                task_type="CAUSAL_LM")
        assert adapted.tsqlora.quality.ess_fraction == target and adapted.tsqlora.ranks is None, name
    # in a run, each refresh's draw keeps it (a flat draw is always reachable; a sharp one can stop at
    # the rows tied at the top score, which the tiny data set here has)
    encoder, articles, task = tiny_classification(tokenizer)
    config = TrainConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=1, seed=0)
    record = run_classification(encoder, tokenizer, articles, METHODS["tsqlora-sampling-ess90"], 2, 0, config, task)
    fractions = [r["effective_fraction"] for r in record["refresh_log"]]
    assert len(fractions) == 6 and all(abs(f - 0.9) < 0.01 for f in fractions), fractions
