"""TsqLoRA in a transformers.Trainer run on a tiny llama: the quality sampler and the dynamic ranks together."""
from __future__ import annotations

import pytest
import torch

from conftest import random_batches, tiny_llama
from sensitivity_lora.training import (QualityConfig, QualitySampler, RankSchedule, TsqLoRACallback, TsqLoRAConfig,
                                       TsqLoRATrainer, initial_ranks, tsqlora_trainer)

torch.set_num_threads(1)


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, seq: int = 10) -> None:
        batch = random_batches(1, batch=n, seq=seq, seed=7)[0]
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def arguments(tmp_path, steps: int = 12):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=5e-3, lr_scheduler_type="linear", report_to=[], use_cpu=True,
                             save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                             dataloader_num_workers=0)


def tsqlora_model(data: Rows):
    """The TsqLoRA start: initial ranks from first-order sensitivity on a few labelled batches."""
    from peft import get_peft_model

    from sensitivity_lora.peft import lora_config_from_ranks

    model = tiny_llama()
    calibration = [{k: torch.stack([data[i][k] for i in range(j, j + 4)]) for k in data[0]} for j in (0, 4)]
    ranks = initial_ranks(model, calibration, 4, ["q_proj", "v_proj", "down_proj"])
    return get_peft_model(model, lora_config_from_ranks(ranks, 4)), ranks


def test_a_trainer_run_with_the_quality_sampler_and_dynamic_ranks(tmp_path):
    data = Rows()
    model, ranks = tsqlora_model(data)
    config = TsqLoRAConfig(quality=QualityConfig(refresh_every=4, pool_size=12, chunk_size=6, temperature=0.5),
                           ranks=RankSchedule(every=4, window=2, stop=0.75, max_moves=3))
    trainer = TsqLoRATrainer(model=model, args=arguments(tmp_path), train_dataset=data, tsqlora=config)
    result = trainer.train()
    callback = trainer.tsqlora
    run = callback.run
    assert [h["step"] for h in run.refreshes] == [0, 4, 8]  # refreshed every K = 4 steps
    assert len(callback.sampler.pool) == 12 and callback.sampler.probs.max() > 2 * callback.sampler.probs.min()
    used = callback.sampler
    loader = trainer.get_train_dataloader()  # the Trainer's loader draws from the sampler the callback refreshes
    assert isinstance(loader.batch_sampler.sampler, QualitySampler) and loader.batch_sampler.sampler is callback.sampler
    assert callback.sampler is not used  # a new loader rebinds the callback to its own sampler
    assert 0 < run.summary(result.metrics["train_runtime"])["scoring_fraction"] < 1
    dynamic = run.dynamic
    assert dynamic.change_steps == [4, 8] and len(dynamic.history) == 3
    assert all(sum(h["ranks"].values()) == sum(ranks.values()) for h in dynamic.history)
    assert dynamic.history[-1]["ranks"] != ranks
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    lrs = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert lrs == pytest.approx([5e-3 * (12 - s) / 12 for s in range(12)], rel=1e-6)  # the schedule, undisturbed
    trainer.save_model(str(tmp_path / "adapter"))
    from sensitivity_lora.peft import verify_ranks

    verify_ranks(model, str(tmp_path / "adapter"))  # the saved config describes the trained layers


def test_the_callback_alone_runs_dynamic_ranks_in_a_plain_trainer(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    callback = TsqLoRACallback(TsqLoRAConfig(quality=None, ranks=RankSchedule(every=3, window=2, stop=1.0)))
    trainer = Trainer(model=model, args=arguments(tmp_path, steps=7), train_dataset=Rows(), callbacks=[callback])
    trainer.train()
    dynamic = callback.run.dynamic
    assert dynamic.change_steps == [3, 6] and callback.run.refreshes == []
    assert sum(dynamic.ranks().values()) == 4 * 4 and len(dynamic.history) == 3
    assert not dynamic.probe.attached


def test_tsqlora_trainer_rejects_a_non_trainer_and_bad_configs():
    with pytest.raises(ValueError, match="Trainer subclass"):
        tsqlora_trainer(object)
    with pytest.raises(ValueError, match="QualityConfig"):
        TsqLoRAConfig(quality={"temperature": 1})


def test_a_resumed_run_says_that_its_draws_differ_and_rescores(tmp_path, caplog):
    from transformers import TrainerControl, TrainerState

    data = Rows()
    model, _ = tsqlora_model(data)
    callback = TsqLoRACallback(TsqLoRAConfig(quality=None, ranks=RankSchedule(every=4, window=2)))
    state = TrainerState(max_steps=12, global_step=5)  # what a run resumed from a step-5 checkpoint starts with
    with caplog.at_level("WARNING", logger="sensitivity_lora.training.trainer"):
        callback.on_train_begin(arguments(tmp_path), state, TrainerControl(), model=model)
    assert "resumed at step 5" in caplog.text
    assert callback.run is not None and callback.run.dynamic.change_steps == [4, 8]  # step 8 is still ahead


def test_an_optimiser_the_rank_changes_cannot_reach_is_refused_at_the_start(tmp_path):
    from transformers import TrainerControl, TrainerState

    data = Rows()
    model, _ = tsqlora_model(data)
    callback = TsqLoRACallback(TsqLoRAConfig(quality=None, ranks=RankSchedule(every=4, window=2)))
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        callback.on_train_begin(arguments(tmp_path), TrainerState(max_steps=12), TrainerControl(), model=model,
                                optimizer=object())  # e.g. DeepSpeed's engine optimiser
    assert callback.run is None
