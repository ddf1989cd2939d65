"""The compared methods, and how each one turns a base model into a trainable adapted model.

Every method gets the same target modules, the same average rank r̄, the same
lora_alpha / r̄ step-size scale and (in :mod:`.finetune`) the same steps, data
and schedule. What differs is only how the ranks (and, for EVA, the initial
A matrices) are chosen:

- ``uniform``: r̄ everywhere (plain LoRA).
- ``sra``/``pra`` and the ``sra-*`` variants: Sensitivity-LoRA through
  :func:`sensitivity_lora.api.sensitivity_peft_model`, with the allocation settings listed in
  :data:`METHODS`; ``sl-eva``, ``sra-cov`` (``sra-cov-gain``), ``uniform-cov`` and ``output-aware`` the same
  with an initialisation from the statistics (docs/method.md §7).
- ``eva``: PEFT's EVA (activation-SVD initialisation, rank redistribution with
  its own ρ = 2), rank budget r̄ per module; ``eva-uniform`` is the same
  initialisation with ρ = 1 (no redistribution) and ``eva-ranks`` plain LoRA
  with the ranks EVA chose, to tell the two effects apart.
- ``adalora``: PEFT's AdaLoRA, initial rank ⌈1.5 r̄⌉ pruned during training to
  a final average of r̄ (its budget schedule needs the total step count).
- ``hyperadalora``: AdaLoRA's P Λ Q written by a small attention hypernetwork
  (:mod:`sensitivity_lora.hyperadalora`), the same ⌈1.5 r̄⌉ → r̄ budget and schedule.
- ``tsqlora``: TsqLoRA (:mod:`sensitivity_lora.training`, docs/method.md): ranks from first-order
  sensitivity on the labelled calibration batches, moved during training on AdaLoRA's schedule
  (Σ r = r̄·M throughout), and training rows drawn by quality score; ``tsqlora-sampling`` is the
  sampling alone (uniform ranks), ``tsqlora-ranks`` the ranks alone (the shared batch plan);
  ``tsqlora-sampling-ess25`` / ``-ess90`` the sampling with a sharper / flatter draw.

- ``newton``: this package's second-order start (docs/method.md §7): one forward + backward over the
  labelled calibration batches gives each target's gradient G and its input Σxxᵀ; ranks by a global
  greedy on the predicted loss decrease ½σ² of G·H^(-1/2), A = the top right singular directions mapped
  back by H^(-1/2), B = 0; ``newton-gain`` the same with each A row scaled so that its adapter's output
  moves per Adam step as far as plain LoRA's (E[(a·x)²] of a PEFT default row).

The field's initialisations, each by PEFT's own code (:mod:`.peers`), uniform rank r̄:

- ``pissa``: PiSSA, A, B from a fast SVD of W (``pissa_niter_4``); base weights become W − s·BA.
- ``olora``: OLoRA, A, B from the QR decomposition of W; base weights become W − s·BA.
- ``rslora``: plain LoRA with rsLoRA's scale α/√r̄ (= 2√r̄ with α = 2r̄) instead of α/r̄.
- ``loraga``: LoRA-GA, A, B from the SVD of the loss gradient on the labelled calibration batches; base rewritten.
- ``corda-ipm`` / ``corda-kpm``: CorDA, SVD of W·C with C from CorDA's own collection (one sequence per
  call), top (IPM) or bottom (KPM) r̄ components; base rewritten.
- ``corda-ipm-cov``: CorDA IPM with C from this package's calibration Σxxᵀ (covariance file): the same
  B·A and residual as ``corda-ipm`` up to CorDA's per-sequence weighting, A and B rescaled per module.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..calibration.targets import resolve_targets
from .budget import adapter_ranks


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "uniform" | "sensitivity" (the package's API, with or without an init) | "eva" | "eva-ranks" | "adalora"
    #          | "hyperadalora" | "tsqlora" | "newton" | "peer" (a PEFT initialisation, :mod:`.peers`)
    allocation: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("uniform", "uniform", {}, "LoRA, rank r̄ in every module"),
    Method("sra", "sensitivity", {"method": "sra"}, "Sensitivity-LoRA, SRA, ρ = 4 (the default)"),
    Method("pra", "sensitivity", {"method": "pra"}, "Sensitivity-LoRA, PRA (3 tiers)"),
    Method("sra-rho2", "sensitivity", {"method": "sra", "rho": 2.0}, "SRA with rank cap ρ = 2"),
    Method("sra-rhoinf", "sensitivity", {"method": "sra", "rho": math.inf}, "SRA, no cap (the paper's rule)"),
    Method("sra-global", "sensitivity", {"method": "sra", "fusion": "global"}, "SRA, global metric only"),
    Method("sra-local", "sensitivity", {"method": "sra", "fusion": "local"}, "SRA, local metrics only"),
    Method("sra-equal", "sensitivity", {"method": "sra", "fusion": "equal"}, "SRA, equal fusion weights"),
    Method("sra-row", "sensitivity", {"method": "sra", "scope": "row"},
           "SRA with scope 'row' (diag(H_row) alone, no d_out factor)"),
    Method("sra-params", "sensitivity", {"method": "sra", "budget_mode": "params"},
           "SRA, LoRA parameter count matched to uniform"),
    Method("sl-eva", "sensitivity", {"init": "eva"},
           "this package's EVA: EVA's ranks and init (ρ = 2) from one calibration pass's Σxxᵀ, exact"),
    Method("sra-cov", "sensitivity", {"method": "sra", "init": "covariance"},
           "SRA ranks, A = top input-covariance eigenvectors, B = 0"),
    Method("sra-cov-gain", "sensitivity", {"method": "sra", "init": "covariance", "init_scale": "default-gain"},
           "sra-cov with A's rows at the input gain of PEFT's default A (only the directions change)"),
    Method("sra-cov-params", "sensitivity", {"method": "sra", "budget_mode": "params", "init": "covariance"},
           "sra-cov with the LoRA parameter count matched to uniform"),
    Method("uniform-cov", "sensitivity", {"method": "uniform", "init": "covariance"},
           "uniform ranks, A = top input-covariance eigenvectors, B = 0"),
    Method("uniform-cov-gain", "sensitivity", {"method": "uniform", "init": "covariance", "init_scale": "default-gain"},
           "uniform-cov with A's rows at the input gain of PEFT's default A"),
    Method("output-aware", "sensitivity", {"init": "output-aware"},
           "ranks and A from the top right singular vectors of W·M (ρ = 2), B = 0"),
    Method("eva", "eva", {"rho": 2.0}, "PEFT EVA (activation SVD, its ρ = 2)"),
    Method("eva-uniform", "eva", {"rho": 1.0}, "PEFT EVA initialisation with uniform ranks (ρ = 1): EVA's init alone"),
    Method("eva-ranks", "eva-ranks", {"rho": 2.0}, "plain LoRA (standard init) with the ranks EVA (ρ = 2) chose: "
           "EVA's ranks alone"),
    Method("adalora", "adalora", {}, "PEFT AdaLoRA, init ⌈1.5 r̄⌉ → final r̄"),
    Method("hyperadalora", "hyperadalora", {}, "HyperAdaLoRA: AdaLoRA's P Λ Q from an attention hypernetwork, "
           "init ⌈1.5 r̄⌉ → final r̄"),
    Method("tsqlora", "tsqlora", {"sampling": True, "ranks": True},
           "TsqLoRA: quality-aware sampling + first-order-sensitivity ranks moved during training"),
    Method("tsqlora-sampling", "tsqlora", {"sampling": True, "ranks": False},
           "TsqLoRA's quality-aware sampling alone, uniform ranks"),
    Method("tsqlora-ranks", "tsqlora", {"sampling": False, "ranks": True},
           "TsqLoRA's dynamic ranks alone, the shared batch plan"),
    # how sharp the draw is: the effective sample size kept by the automatic τ (default 0.5 of the pool)
    Method("tsqlora-sampling-ess25", "tsqlora", {"sampling": True, "ranks": False, "ess_fraction": 0.25},
           "tsqlora-sampling with a sharper draw: n_eff = 25 % of the pool"),
    Method("tsqlora-sampling-ess90", "tsqlora", {"sampling": True, "ranks": False, "ess_fraction": 0.9},
           "tsqlora-sampling with a flatter draw: n_eff = 90 % of the pool"),
    Method("newton", "newton", {"rho": 2.0},
           "this package's second-order start: ranks (global greedy on predicted loss decrease) and A from the "
           "SVD of G·H^(-1/2) (ρ = 2), B = 0"),
    Method("newton-gain", "newton", {"rho": 2.0, "normalise": "gain"},
           "newton with each A row scaled to the output energy of a PEFT default row (plain LoRA's step size)"),
    # the field's initialisations, by PEFT's own code (peers.py); "rewrites base" = W replaced by W − s·BA
    Method("pissa", "peer", {"init": "pissa_niter_4"},
           "PEFT PiSSA (fast SVD, 4 iterations): A, B = top singular triplets of W; rewrites base"),
    Method("olora", "peer", {"init": "olora"}, "PEFT OLoRA: A, B from the QR of W; rewrites base"),
    Method("rslora", "peer", {"use_rslora": True}, "PEFT rsLoRA: plain LoRA init, scale α/√r̄"),
    Method("loraga", "peer", {"init": "lora_ga"},
           "PEFT LoRA-GA: A, B from the SVD of the calibration-loss gradient; rewrites base"),
    Method("corda-ipm", "peer", {"init": "corda", "corda_method": "ipm", "covariance": "peft"},
           "PEFT CorDA IPM (own covariance collection): top r̄ of SVD(W·C); rewrites base"),
    Method("corda-kpm", "peer", {"init": "corda", "corda_method": "kpm", "covariance": "peft"},
           "PEFT CorDA KPM (own covariance collection): bottom r̄ of SVD(W·C); rewrites base"),
    Method("corda-ipm-cov", "peer", {"init": "corda", "corda_method": "ipm", "covariance": "package"},
           "PEFT CorDA IPM fed this package's covariance file (Σxxᵀ/n); rewrites base"),
)}


def parse_methods(names: Iterable[str]) -> list[Method]:
    """Method objects for names (``all`` = every method), with a clear error for unknown names."""
    names = list(names)
    if names == ["all"]:
        return list(METHODS.values())
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)} or 'all'")
    return [METHODS[n] for n in names]


@dataclass
class Adapted:
    """A model ready to train, and what it took to build it."""

    peft_model: nn.Module
    forward: Callable[..., Any]  # call this in training (the tuner's forward: AdaLoRA adds its regulariser there)
    targets: list[str]
    setup_seconds: float  # calibration + allocation (+ EVA's SVD, a peer's preprocessing); ~0 for uniform
    after_step: Callable[[int], None] | None = None
    allocation: Any = None  # the sensitivity Allocation, when there is one
    read_ranks: Callable[[list[str]], dict[str, int]] | None = None  # a model without PEFT LoRA layers says itself
    tsqlora: Any = None  # a training.TsqLoRAConfig for the training loop (the TsqLoRA methods)
    parameter_counts: dict | None = None  # HyperAdaLoRA: the hypernetwork's size against what it generates
    rewrites_base: bool = False  # base weights replaced by the residual W − s·BA (PiSSA, OLoRA, LoRA-GA, CorDA)

    def ranks(self) -> dict[str, int]:
        if self.read_ranks is not None:
            return self.read_ranks(self.targets)
        return adapter_ranks(self.peft_model, self.targets)


def build_adapted(
    model: nn.Module,
    method: Method,
    avg_rank: int,
    calibration: list[Mapping[str, torch.Tensor]],
    total_steps: int,
    target_modules: str | list[str] | None = None,
    lora_alpha: float | None = None,
    task_type: str | None = None,
    calibration_labels: list[torch.Tensor] | None = None,
) -> Adapted:
    """Wrap ``model`` (modified in place: pass a fresh copy) with ``method``'s adapter.

    ``calibration`` is a list of input batches (no labels needed) used by the
    data-driven methods; ``total_steps`` is the training length (AdaLoRA's schedule).
    TsqLoRA's first-order sensitivity and LoRA-GA's gradient need labels: ``calibration_labels``
    (one tensor per batch), or for a causal LM the batches' own tokens.
    """
    from peft import get_peft_model

    if int(avg_rank) != avg_rank or avg_rank < 1:
        raise ValueError(f"avg_rank must be a positive integer for a comparison with uniform LoRA, got {avg_rank}")
    avg_rank = int(avg_rank)
    alpha = float(lora_alpha) if lora_alpha is not None else 2.0 * avg_rank
    targets = resolve_targets(model, target_modules)
    common = {"task_type": task_type} if task_type else {}
    after_step = None
    allocation = None
    read_ranks = None
    counts = None
    rewrites = False
    start = time.perf_counter()
    if method.kind == "uniform":
        from peft import LoraConfig

        peft_model = get_peft_model(model, LoraConfig(r=avg_rank, lora_alpha=alpha, target_modules=targets, **common))
    elif method.kind == "sensitivity":
        from ..api import sensitivity_peft_model

        peft_model, allocation = sensitivity_peft_model(model, calibration, avg_rank, lora_alpha=alpha,
                                                        lora_kwargs=common, target_modules=targets, progress=False,
                                                        **dict(method.allocation))
    elif method.kind == "eva":
        peft_model = _eva(model, avg_rank, alpha, targets, float(method.allocation["rho"]), calibration, common)
    elif method.kind == "eva-ranks":
        from ..peft import lora_config_from_ranks

        eva_model = _eva(copy.deepcopy(model), avg_rank, alpha, targets, float(method.allocation["rho"]),
                         calibration, common)
        ranks = adapter_ranks(eva_model, targets)
        del eva_model
        peft_model = get_peft_model(model, lora_config_from_ranks(ranks, avg_rank, alpha, **common))
    elif method.kind == "adalora":
        peft_model, after_step = _adalora(model, avg_rank, alpha, targets, total_steps, common)
    elif method.kind == "hyperadalora":
        from ..hyperadalora import get_hyperadalora_model

        phases = adalora_schedule(total_steps)  # the same phases as ``adalora``
        peft_model = get_hyperadalora_model(model, avg_rank, total_steps, lora_alpha=alpha, target_modules=targets,
                                            tinit=phases["tinit"], tfinal=phases["tfinal"],
                                            delta_t=phases["deltaT"], **dict(method.allocation))
        after_step, read_ranks = peft_model.update_and_allocate, peft_model.ranks
        counts = peft_model.parameter_counts()
    elif method.kind == "tsqlora":
        peft_model, tsqlora = _tsqlora(model, method, avg_rank, alpha, targets, total_steps, common,
                                       _labelled(calibration, calibration_labels, task_type))
    elif method.kind == "newton":
        from ..api import newton_peft_model

        labelled = _labelled(calibration, calibration_labels, task_type, method.name)
        peft_model, _ = newton_peft_model(model, labelled, avg_rank, lora_alpha=alpha, target_modules=targets,
                                          rho=float(method.allocation["rho"]), task_type=task_type,
                                          normalise=method.allocation.get("normalise", "rows"))
    elif method.kind == "peer":
        from .peers import build_peer, needs_labels, rewrites_base

        labelled = (_labelled(calibration, calibration_labels, task_type, method.name)
                    if needs_labels(method.allocation) else None)
        peft_model = build_peer(model, method.allocation, avg_rank, alpha, targets, calibration, common, labelled)
        rewrites = rewrites_base(method.allocation)
    else:  # pragma: no cover - METHODS only holds the kinds above
        raise ValueError(f"unknown method kind {method.kind!r}")
    seconds = time.perf_counter() - start
    return Adapted(peft_model, peft_model.base_model, targets, seconds, after_step, allocation, read_ranks,
                   tsqlora if method.kind == "tsqlora" else None, counts,
                   rewrites_base=rewrites)


def _eva(model: nn.Module, avg_rank: int, alpha: float, targets: list[str], rho: float,
         calibration: list[Mapping[str, torch.Tensor]], common: Mapping[str, Any]) -> nn.Module:
    """PEFT's EVA on ``model`` (in place): SVD of the targets' inputs, ranks redistributed up to ρ·r̄."""
    from peft import EvaConfig, LoraConfig, get_peft_model
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    config = LoraConfig(r=avg_rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="eva",
                        eva_config=EvaConfig(rho=rho, use_label_mask=False), **common)
    peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
    with torch.no_grad():
        initialize_lora_eva_weights(peft_model, dataloader=calibration, show_progress_bar=False)
    return peft_model


def adalora_schedule(total_steps: int) -> dict[str, int]:
    """AdaLoRA's budget phases scaled to a short run: 10 % warm-up, 20 % final, ~10 reallocations."""
    tinit = max(1, total_steps // 10)
    tfinal = max(1, total_steps // 5)
    if tinit >= total_steps - tfinal:
        raise ValueError(f"AdaLoRA needs more steps to prune ranks during training; got total_steps={total_steps}")
    return {"tinit": tinit, "tfinal": tfinal, "deltaT": max(1, (total_steps - tinit - tfinal) // 10)}


def _adalora(model: nn.Module, avg_rank: int, alpha: float, targets: list[str], total_steps: int,
             common: dict) -> tuple[nn.Module, Callable[[int], None]]:
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(init_r=math.ceil(1.5 * avg_rank), target_r=avg_rank, lora_alpha=alpha,
                           target_modules=targets, total_step=total_steps, **adalora_schedule(total_steps), **common)
    peft_model = get_peft_model(model, config)
    return peft_model, lambda step: peft_model.base_model.update_and_allocate(step)


def _labelled(calibration: list[Mapping[str, torch.Tensor]], labels: list[torch.Tensor] | None,
              task_type: str | None, method: str = "TsqLoRA") -> list[dict[str, torch.Tensor]]:
    """The calibration batches with labels: the given ones, or a causal LM's own tokens (padding ignored)."""
    if labels is not None:
        if len(labels) != len(calibration):
            raise ValueError(f"{len(labels)} label tensors for {len(calibration)} calibration batches")
        return [{**b, "labels": y} for b, y in zip(calibration, labels)]
    if task_type == "CAUSAL_LM":
        return [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)} for b in calibration]
    raise ValueError(f"{method} needs labelled calibration batches: pass calibration_labels")


def _tsqlora(model: nn.Module, method: Method, avg_rank: int, alpha: float, targets: list[str], total_steps: int,
             common: Mapping[str, Any], labelled: list[dict[str, torch.Tensor]]) -> tuple[nn.Module, Any]:
    """TsqLoRA's adapter and its training-time config: initial ranks from first-order sensitivity and rank
    changes on AdaLoRA's phases (uniform ranks without), pools rescored about ten times per run."""
    from peft import LoraConfig, get_peft_model

    from ..peft import lora_config_from_ranks
    from ..training import QualityConfig, RankSchedule, TsqLoRAConfig, initial_ranks

    schedule = None
    if method.allocation["ranks"]:
        ranks = initial_ranks(model, labelled, avg_rank, targets)
        peft_model = get_peft_model(model, lora_config_from_ranks(ranks, avg_rank, alpha, **common))
        phases = adalora_schedule(total_steps)
        schedule = RankSchedule(start=phases["tinit"], every=phases["deltaT"], stop=total_steps - phases["tfinal"],
                                window=max(1, min(phases["deltaT"], 10)))
    else:
        peft_model = get_peft_model(model, LoraConfig(r=avg_rank, lora_alpha=alpha, target_modules=targets, **common))
    quality = (QualityConfig(refresh_every=max(1, total_steps // 10),
                             ess_fraction=method.allocation.get("ess_fraction", QualityConfig.ess_fraction))
               if method.allocation["sampling"] else None)
    return peft_model, TsqLoRAConfig(quality=quality, ranks=schedule)
