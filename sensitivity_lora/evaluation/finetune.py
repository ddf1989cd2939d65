"""One training loop for every method: the same batches, steps and learning-rate schedule.

Fairness is built in rather than promised: the batch order comes from
:func:`batch_plan`, which depends only on the example count, batch size, step
count and seed (never on the method), and the schedule is a fixed
linear-warmup/linear-decay rule of the step number. Each run records a digest
of its plan so the results file shows that the methods saw the same data.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings shared by every method of a comparison."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be ≥ 1, got steps={self.steps}, batch_size={self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps} with steps={self.steps}")


@dataclass
class TrainLog:
    """What a run did: per-step losses, wall time and the digest of its batch plan."""

    losses: list[float]
    seconds: float
    plan_digest: str
    steps: int
    trainable_params: int
    lrs: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # TsqLoRA: scoring cost, refreshes, rank changes
    eval_curve: list[dict] = field(default_factory=list)  # {"step": s, metric: value, ...} every eval_every steps
    eval_seconds: float = 0.0  # spent in the periodic evaluations, not counted in ``seconds``


def batch_plan(n_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Example indices of every step: seeded epochs of permutations, cut into batches.

    A batch never spans two epochs, so each epoch sees every example once
    (the last, short batch of an epoch is kept as it is).
    """
    if n_examples < 1:
        raise ValueError("no training examples: the training set is empty")
    g = torch.Generator().manual_seed(seed)
    plan: list[list[int]] = []
    while len(plan) < steps:
        order = torch.randperm(n_examples, generator=g).tolist()
        for start in range(0, n_examples, batch_size):
            plan.append(order[start:start + batch_size])
            if len(plan) == steps:
                break
    return plan


def plan_digest(plan: list[list[int]]) -> str:
    """A short hash of a batch plan (equal plans give equal digests)."""
    return hashlib.sha256(repr(plan).encode()).hexdigest()[:16]


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to 1, then linear decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def train(
    model: nn.Module,
    make_batch: Callable[[list[int]], Mapping[str, torch.Tensor]],
    n_examples: int,
    config: TrainConfig,
    forward: Callable[..., object] | None = None,
    after_step: Callable[[int], None] | None = None,
    tsqlora: Any = None,
    evaluate: Callable[[], Mapping[str, float]] | None = None,
    eval_every: int = 0,
) -> TrainLog:
    """Train the parameters of ``model`` that require grad with AdamW.

    ``make_batch(indices)`` returns the model inputs including ``labels``;
    ``forward`` (default ``model``) must return an object with ``.loss``.
    ``after_step(step)`` runs after ``optimizer.step()`` and before the
    gradients are cleared (AdaLoRA's ``update_and_allocate`` needs them).
    ``tsqlora`` (a ``training.TsqLoRAConfig``): with its quality part each step's rows are drawn
    by quality score instead of taken from the plan (as many per step), with its ranks part the
    ranks move after scheduled steps; the digest is of the rows actually used.
    ``evaluate()`` (held-out metrics, model in eval mode, no gradients), when given with
    ``eval_every`` > 0, runs after every ``eval_every``-th step and after the last; its results form
    the log's ``eval_curve`` and its time is kept out of the training time. It draws no random
    numbers, so the training run is the same with or without it.
    """
    config.validate()
    if eval_every < 0 or (eval_every and evaluate is None):
        raise ValueError(f"eval_every must be ≥ 0 and needs an evaluate function, got {eval_every}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: build the adapter before training")
    forward = forward or model
    n_params = sum(p.numel() for p in params)
    plan = batch_plan(n_examples, config.batch_size, config.steps, config.seed)
    torch.manual_seed(config.seed)  # dropout masks
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup_steps, config.steps))
    run = None
    if tsqlora is not None:
        from ..training.loop import TsqLoRARun

        run = TsqLoRARun(model, tsqlora, config.steps, make_batch=make_batch, n_examples=n_examples, seed=config.seed)
    model.train()
    losses, lrs, used, curve = [], [], [], []
    eval_seconds = 0.0
    start = time.perf_counter()
    for step, indices in enumerate(plan):
        if run is not None:
            if run.sampler is not None:
                indices = run.batch(step, len(indices))
            run.before_step(step)
        used.append(indices)
        loss = forward(**make_batch(indices)).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}; lower the learning rate")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if after_step is not None:
            after_step(step)
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if run is not None and run.after_step(step + 1, optimizer):
            params = [p for p in model.parameters() if p.requires_grad]  # resized layers: new tensors to clip
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == len(plan)):
            eval_start = time.perf_counter()
            curve.append({"step": step + 1, **_evaluated(model, evaluate)})
            eval_seconds += time.perf_counter() - eval_start
    model.eval()
    seconds = time.perf_counter() - start - eval_seconds
    if run is not None:
        run.finish()
    return TrainLog(losses=losses, seconds=seconds, plan_digest=plan_digest(used), steps=len(plan),
                    trainable_params=n_params, lrs=lrs, extra=run.summary(seconds) if run is not None else {},
                    eval_curve=curve, eval_seconds=eval_seconds)


def _evaluated(model: nn.Module, evaluate: Callable[[], Mapping[str, float]]) -> dict[str, float]:
    """One mid-training evaluation, in eval mode without gradients; the model goes back to training."""
    model.eval()
    try:
        with torch.no_grad():
            return {k: float(v) for k, v in evaluate().items()}
    finally:
        model.train()


def curves(log: TrainLog) -> dict[str, Any]:
    """The record fields of a run's curves: every step's training loss, and the periodic held-out metrics."""
    out: dict[str, Any] = {"loss_curve": log.losses}
    if log.eval_curve:
        out["eval_curve"] = log.eval_curve
        out["eval_seconds"] = log.eval_seconds
    return out


def mean_last(values: list[float], fraction: float = 0.2) -> float:
    """Mean of the last ``fraction`` of a loss curve (a less noisy final training loss)."""
    if not values:
        return math.nan
    k = max(1, int(len(values) * fraction))
    return sum(values[-k:]) / k
