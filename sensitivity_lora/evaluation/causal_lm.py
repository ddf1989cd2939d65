"""Causal-LM fine-tuning with an adapted decoder; scored by held-out perplexity.

In the study: SmolLM2-135M on the BBC articles of one category, each article
cut to its first ``seq_len`` tokens. The held-out articles are fixed across
seeds; a seed picks the training articles, the LoRA initialisation and the
batch order.
"""
from __future__ import annotations

import copy
import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .budget import budget_summary, target_dims
from .finetune import TrainConfig, curves, mean_last, train
from .methods import Method, build_adapted

HELDOUT_SPLIT_SEED = 54321


@dataclass(frozen=True)
class CausalLMTask:
    n_train: int = 160
    n_eval: int = 40
    seq_len: int = 128
    n_val: int = 0  # validation articles (for choosing a learning rate), kept apart from training and held-out
    n_calibration: int = 32  # training articles the data-driven methods calibrate on
    calibration_batch_size: int = 8
    eval_batch_size: int = 8


def split_texts(texts: Sequence[str], n_train: int, n_eval: int, seed: int,
                n_val: int = 0) -> tuple[list[str], list[str], list[str]]:
    """(train, held-out, validation): fixed held-out and validation sets, and a seeded draw of training
    texts from the rest (so a learning rate picked on the validation texts never saw the held-out ones)."""
    pool = sorted(texts)
    random.Random(HELDOUT_SPLIT_SEED).shuffle(pool)
    if len(pool) < n_train + n_eval + n_val:
        raise ValueError(f"{len(pool)} texts are fewer than {n_train} train + {n_eval} held-out + {n_val} "
                         "validation; lower the counts")
    rest = pool[n_eval + n_val:]
    return random.Random(seed).sample(rest, n_train), pool[:n_eval], pool[n_eval:n_eval + n_val]


def lm_tensors(texts: Sequence[str], tokenizer, seq_len: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels (padding → -100) for all texts, padded to ``seq_len``."""
    from ..data import calibration_batches

    (batch,) = calibration_batches(list(texts), tokenizer, seq_len=seq_len, batch_size=len(texts))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}


@torch.no_grad()
def perplexity(model: nn.Module, data: dict[str, torch.Tensor], batch_size: int) -> float:
    """exp(mean next-token NLL over every real token of the set), summed token-wise across batches."""
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(data["input_ids"]), batch_size):
        batch = {k: v[start:start + batch_size] for k, v in data.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        target = batch["labels"][:, 1:]
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(),
                                           ignore_index=-100, reduction="sum")
        nll += float(loss)
        count += int((target != -100).sum())
    if count == 0:
        raise ValueError("the held-out set has no tokens to score")
    return math.exp(nll / count)


def run_causal_lm(base_model: nn.Module, tokenizer, texts: Sequence[str], method: Method, avg_rank: int,
                  seed: int, train_config: TrainConfig, task: CausalLMTask = CausalLMTask(),
                  eval_every: int = 0, split: str = "test", save_dir: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune one method at one seed; returns a JSON-ready record with the perplexity of ``split``:
    "test" (the held-out texts) or "validation" (``task.n_val`` texts, for choosing a learning rate).
    ``eval_every`` > 0 adds that perplexity every that many steps (``eval_curve``). ``save_dir``: the trained
    adapter is saved there, loadable on the original base model (a base-rewriting peer's is converted)."""
    train_texts, test_texts, val_texts = split_texts(texts, task.n_train, task.n_eval, seed, task.n_val)
    if split not in ("test", "validation"):
        raise ValueError(f"split must be 'test' or 'validation', got {split!r}")
    if split == "validation" and not val_texts:
        raise ValueError("the validation split is empty: set n_val (--n-val) above 0")
    eval_texts = test_texts if split == "test" else val_texts
    train_data = lm_tensors(train_texts, tokenizer, task.seq_len)
    eval_data = lm_tensors(eval_texts, tokenizer, task.seq_len)
    calibration = [{k: train_data[k][s:s + task.calibration_batch_size] for k in ("input_ids", "attention_mask")}
                   for s in range(0, task.n_calibration, task.calibration_batch_size)]
    torch.manual_seed(seed)
    adapted = build_adapted(copy.deepcopy(base_model), method, avg_rank, calibration, train_config.steps,
                            task_type="CAUSAL_LM")
    initial = _initial_copy(adapted, save_dir)
    log = train(adapted.peft_model, lambda idx: {k: v[idx] for k, v in train_data.items()}, len(train_texts),
                train_config, forward=adapted.forward, after_step=adapted.after_step, tsqlora=adapted.tsqlora,
                eval_every=eval_every,
                evaluate=lambda: {"perplexity": perplexity(adapted.peft_model, eval_data, task.eval_batch_size)})
    ranks = adapted.ranks()
    if save_dir is not None:
        from .peers import save_adapter

        save_adapter(adapted.peft_model, save_dir, initial.name if initial is not None else None)
        if initial is not None:
            initial.cleanup()
    record = {
        "task": "causal_lm", "method": method.name, "avg_rank": avg_rank, "seed": seed,
        "lr": train_config.lr, "split": split, "n_val": task.n_val, "steps_planned": train_config.steps,
        "perplexity": perplexity(adapted.peft_model, eval_data, task.eval_batch_size),
        "final_train_loss": mean_last(log.losses),
        "setup_seconds": adapted.setup_seconds, "train_seconds": log.seconds,
        "steps": log.steps, "plan_digest": log.plan_digest, "trainable_params_at_start": log.trainable_params,
        "n_train": len(train_texts), "n_eval": len(eval_texts), "ranks": ranks,
        **budget_summary(ranks, target_dims(adapted.peft_model, adapted.targets)),
        **log.extra,
        **curves(log),
        **({"parameter_counts": adapted.parameter_counts} if adapted.parameter_counts else {}),
        **({"adapter_dir": str(save_dir)} if save_dir is not None else {}),
    }
    return record


def _initial_copy(adapted, save_dir: str | Path | None) -> tempfile.TemporaryDirectory | None:
    """A base-rewriting peer's adapter as initialised, kept until the trained one is converted against it."""
    if save_dir is None or not adapted.rewrites_base:
        return None
    from .peers import save_initial_adapter

    folder = tempfile.TemporaryDirectory(prefix="initial-adapter-")
    save_initial_adapter(adapted.peft_model, folder.name)
    return folder

