"""Text classification with an adapted encoder: BBC News 5 classes with MiniLM-L6 in the study.

The model is the encoder, mean pooling over non-padding tokens (how MiniLM
sentence embeddings are made) and a linear head. The head is trained in every
method alike; LoRA goes on the encoder's linear layers. The test set (and the
validation set, for choosing a learning rate) is fixed across seeds; a seed picks
the training articles, the head's initialisation, the LoRA initialisation and the
batch order.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .budget import budget_summary, target_dims
from .finetune import TrainConfig, curves, mean_last, train
from .methods import Method, build_adapted

TEST_SPLIT_SEED = 12345  # the test articles never depend on the run's seed


class MeanPoolClassifier(nn.Module):
    """encoder → mean over real tokens → linear head; returns a loss when given labels."""

    def __init__(self, encoder: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, **_: Any) -> SequenceClassifierOutput:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        logits = self.head(pooled)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


Split = list[tuple[str, str]]


def split_by_class(articles: Sequence[tuple[str, str]], n_train_per_class: int, n_test_per_class: int,
                   seed: int, n_val_per_class: int = 0) -> tuple[Split, Split, Split]:
    """(train, test, validation) lists of (label, text): fixed test and validation sets, disjoint, and a
    seeded draw of training articles from the rest (with no validation set, the same draw as before it
    existed)."""
    by_class: dict[str, list[str]] = {}
    for label, text in articles:
        by_class.setdefault(label, []).append(text)
    if len(by_class) < 2:
        raise ValueError(f"classification needs at least 2 classes, got {sorted(by_class)}")
    train_set, test_set, val_set = [], [], []
    held = n_test_per_class + n_val_per_class
    for label in sorted(by_class):
        texts = sorted(by_class[label])  # independent of file order
        random.Random(f"{TEST_SPLIT_SEED}-{label}").shuffle(texts)
        if len(texts) < n_train_per_class + held:
            raise ValueError(f"class {label!r} has {len(texts)} articles, fewer than {n_train_per_class} train + "
                             f"{n_test_per_class} test + {n_val_per_class} validation; lower the counts")
        test_set += [(label, t) for t in texts[:n_test_per_class]]
        val_set += [(label, t) for t in texts[n_test_per_class:held]]
        pool = texts[held:]
        train_set += [(label, t) for t in random.Random(f"{seed}-{label}").sample(pool, n_train_per_class)]
    return train_set, test_set, val_set


def macro_f1(pred: Sequence[int], gold: Sequence[int], n_classes: int) -> float:
    """Unweighted mean over classes of F1 (a class never predicted nor present scores 0)."""
    scores = []
    for c in range(n_classes):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / n_classes


@dataclass(frozen=True)
class ClassificationTask:
    """Everything fixed across methods and seeds of one comparison."""

    n_train_per_class: int = 32
    n_test_per_class: int = 40
    max_len: int = 128
    n_calibration: int = 64  # training articles (labels unused) the data-driven methods calibrate on
    n_val_per_class: int = 0  # validation articles (for choosing a learning rate), apart from train and test
    calibration_batch_size: int = 16
    eval_batch_size: int = 32


def _encode(tokenizer, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, truncation=True, max_length=max_len, padding="max_length", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def test_logits(model: nn.Module, data: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(data["input_ids"]), batch_size):
        batch = {k: v[start:start + batch_size] for k, v in data.items()}
        out.append(model(**batch).logits.float())
    return torch.cat(out)


def predict(model: nn.Module, data: dict[str, torch.Tensor], batch_size: int) -> list[int]:
    return test_logits(model, data, batch_size).argmax(-1).tolist()


def test_metrics(model: nn.Module, data: dict[str, torch.Tensor], labels: Sequence[int],
                 batch_size: int) -> dict[str, float]:
    """Accuracy and mean cross-entropy on a labelled set (the held-out curve of a run)."""
    logits = test_logits(model, data, batch_size)
    gold = torch.as_tensor(list(labels))
    return {"accuracy": float((logits.argmax(-1) == gold).double().mean()),
            "loss": float(nn.functional.cross_entropy(logits, gold))}


def run_classification(encoder: nn.Module, tokenizer, articles: Sequence[tuple[str, str]], method: Method,
                       avg_rank: int, seed: int, train_config: TrainConfig,
                       task: ClassificationTask = ClassificationTask(), eval_every: int = 0,
                       split: str = "test") -> dict[str, Any]:
    """Fine-tune one method at one seed and score it on ``split``: "test" or "validation" (the
    ``task.n_val_per_class`` articles per class kept for choosing a learning rate); returns a JSON-ready
    record. ``eval_every`` > 0 adds that split's accuracy and loss every that many steps (``eval_curve``)."""
    if split not in ("test", "validation"):
        raise ValueError(f"split must be 'test' or 'validation', got {split!r}")
    if split == "validation" and task.n_val_per_class < 1:
        raise ValueError("the validation split is empty: set n_val_per_class (--val-per-class) above 0")
    train_set, test_set, val_set = split_by_class(articles, task.n_train_per_class, task.n_test_per_class, seed,
                                                  task.n_val_per_class)
    if split == "validation":
        test_set = val_set  # scored in its place; the test articles stay unseen
    labels = sorted({label for label, _ in train_set})
    index = {label: i for i, label in enumerate(labels)}
    train_enc = _encode(tokenizer, [t for _, t in train_set], task.max_len)
    train_labels = torch.tensor([index[label] for label, _ in train_set])
    test_enc = _encode(tokenizer, [t for _, t in test_set], task.max_len)
    test_labels = [index[label] for label, _ in test_set]

    torch.manual_seed(seed)  # head and LoRA initialisation
    model = MeanPoolClassifier(copy.deepcopy(encoder), len(labels)).eval()
    # calibrate on a seeded, class-mixed subset of the training articles (the split lists them by class)
    picked = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))[:task.n_calibration]
    calibration = [{k: v[picked[s:s + task.calibration_batch_size]] for k, v in train_enc.items()}
                   for s in range(0, len(picked), task.calibration_batch_size)]
    adapted = build_adapted(model, method, avg_rank, calibration, train_config.steps,
                            calibration_labels=[train_labels[picked[s:s + task.calibration_batch_size]]
                                                for s in range(0, len(picked), task.calibration_batch_size)])
    for p in adapted.peft_model.base_model.model.head.parameters():
        p.requires_grad_(True)  # the task head trains in every method

    def make_batch(idx: list[int]) -> dict[str, torch.Tensor]:
        return {**{k: v[idx] for k, v in train_enc.items()}, "labels": train_labels[idx]}

    log = train(adapted.peft_model, make_batch, len(train_set), train_config, forward=adapted.forward,
                after_step=adapted.after_step, tsqlora=adapted.tsqlora, eval_every=eval_every,
                evaluate=lambda: test_metrics(adapted.peft_model, test_enc, test_labels, task.eval_batch_size))
    preds = predict(adapted.peft_model, test_enc, task.eval_batch_size)
    ranks = adapted.ranks()
    record = {
        "task": "classification", "method": method.name, "avg_rank": avg_rank, "seed": seed,
        "accuracy": sum(p == g for p, g in zip(preds, test_labels)) / len(test_labels),
        "macro_f1": macro_f1(preds, test_labels, len(labels)),
        "final_train_loss": mean_last(log.losses),
        "setup_seconds": adapted.setup_seconds, "train_seconds": log.seconds,
        "steps": log.steps, "plan_digest": log.plan_digest, "trainable_params_at_start": log.trainable_params,
        "n_train": len(train_set), "n_test": len(test_set), "split": split, "n_val": task.n_val_per_class,
        "ranks": ranks,
        **budget_summary(ranks, target_dims(adapted.peft_model, adapted.targets)),
        **log.extra,
        **curves(log),
        **({"parameter_counts": adapted.parameter_counts} if adapted.parameter_counts else {}),
    }
    if adapted.allocation is not None:
        record["concentration"] = _concentration(adapted.allocation)
    return record


def _concentration(allocation: Any) -> dict | None:
    report = getattr(allocation, "concentration", None)
    return dict(report()) if callable(report) else None
