"""The field's LoRA initialisations, built by PEFT's own code: the ``peer`` methods of :data:`.methods.METHODS`.

Each peer gets the harness's targets, rank r̄ in every module and lora_alpha; only the
initialisation (and, for rsLoRA, the scale) differs. ``spec`` is the method's ``allocation``:

- ``{"init": "pissa_niter_4"}`` PiSSA: A, B from a fast SVD (4 subspace iterations) of W, W ← W − s·BA.
- ``{"init": "olora"}`` OLoRA: B = Q_r, A = R_r of W's QR, W ← W − s·BA.
- ``{"use_rslora": True}`` rsLoRA: plain LoRA's init, scale α/√r instead of α/r.
- ``{"init": "lora_ga"}`` LoRA-GA: A, B from the SVD of the loss gradient on the labelled
  calibration batches (PEFT's defaults: direction ArB2r, "stable" scale, γ = 16), W ← W − s·BA.
- ``{"init": "corda", "corda_method": "ipm"|"kpm", "covariance": "peft"|"package"}`` CorDA:
  SVD of W·C (C the input covariance); IPM keeps the top r components, KPM the bottom r;
  W ← W − s·BA. C from CorDA's own collection, or from this package's Σxxᵀ through
  :func:`sensitivity_lora.init.corda.write_corda_covariance_file` (PEFT then never runs the model).

All but rsLoRA rewrite the base weights (the residual W − s·BA), so the adapted model's output
at step 0 is the base model's; harmless here because every run wraps a fresh copy.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..folders import write_folder_whole
from ..peft import ADAPTER_FILES

_BASE_REWRITING = ("olora", "lora_ga", "corda")


def rewrites_base(spec: Mapping[str, Any]) -> bool:
    """Whether the peer replaces the base weights by the residual W − s·BA."""
    init = spec.get("init", True)
    return isinstance(init, str) and (init.startswith("pissa") or init in _BASE_REWRITING)


def needs_labels(spec: Mapping[str, Any]) -> bool:
    """LoRA-GA estimates a gradient: it needs labelled calibration batches."""
    return spec.get("init") == "lora_ga"


def build_peer(model: nn.Module, spec: Mapping[str, Any], avg_rank: int, alpha: float, targets: list[str],
               calibration: list[Mapping[str, torch.Tensor]], common: Mapping[str, Any],
               labelled: list[dict[str, torch.Tensor]] | None = None) -> nn.Module:
    """``model`` (modified in place) wrapped by PEFT with the peer's initialisation; preprocessing included."""
    from peft import LoraConfig, get_peft_model

    init = spec.get("init", True)
    lora = dict(r=avg_rank, lora_alpha=alpha, target_modules=targets,
                use_rslora=bool(spec.get("use_rslora", False)), **common)
    if init == "lora_ga":
        from peft import LoraGAConfig

        config = LoraConfig(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(), **lora)
        _loraga_gradients(model, config, labelled)
        return get_peft_model(model, config)
    if init == "corda":
        config = _corda(model, spec, lora, targets, calibration)
        return get_peft_model(model, config)
    return get_peft_model(model, LoraConfig(init_lora_weights=init, **lora))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _loraga_gradients(model: nn.Module, config: Any, labelled: list[dict[str, torch.Tensor]] | None) -> None:
    """PEFT's ``preprocess_loraga``: the mean gradient of every target weight over the labelled batches."""
    from peft import preprocess_loraga

    if not labelled:
        raise ValueError("LoRA-GA needs labelled calibration batches for its gradient estimate")
    device = _device(model)

    def train_step() -> None:
        # PEFT turns on grad for the target weights only, counts backward calls per module and divides
        # the accumulated .grad by that count: one backward per batch gives the mean over batches
        for batch in labelled:
            model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()

    with warnings.catch_warnings():
        # the first target's input needs no grad (the embeddings are frozen there): torch warns that the hook
        # fires on the output gradient, which is all PEFT's counting hook needs
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        preprocess_loraga(model, config, train_step)
    # PEFT restores the caller's train/eval mode and requires_grad flags and drops the targets' .grad;
    # clear anything else a custom forward may have left
    model.zero_grad(set_to_none=True)
    # a target with no gradient (count 0) silently falls back to the Gaussian init in lora_ga_init: refuse
    wanted = set(config.target_modules)
    missing = [n for n, m in model.named_modules() if n in wanted and not hasattr(m, "_peft_loraga_grad")]
    if missing:
        raise RuntimeError(f"LoRA-GA got no gradient for {len(missing)} targets (first: {missing[0]}): "
                           "are they used in the forward pass?")


def _corda(model: nn.Module, spec: Mapping[str, Any], lora: Mapping[str, Any], targets: list[str],
           calibration: list[Mapping[str, torch.Tensor]]) -> Any:
    """PEFT's ``preprocess_corda`` on ``model``; returns the LoraConfig for ``get_peft_model``."""
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    method, source = spec["corda_method"], spec.get("covariance", "peft")
    if source == "peft":
        config = LoraConfig(init_lora_weights="corda", corda_config=CordaConfig(corda_method=method), **lora)
        preprocess_corda(model, config, run_model=_one_sequence_at_a_time(model, calibration))
        return config
    if source != "package":
        raise ValueError(f"CorDA covariance source must be 'peft' or 'package', got {source!r}")
    from ..calibration.one_pass import calibrate
    from ..init.corda import write_corda_covariance_file
    from ..init.state import group_sums_from_statistics

    stats = calibrate(model, calibration, target_modules=targets, hessian="full", progress=False)
    with tempfile.TemporaryDirectory(prefix="corda-") as folder:
        # per-token second moment S/n over the non-padding tokens, keyed by model.named_modules();
        # scale 1: B·A and the residual do not depend on a constant factor, A and B separately do
        path = write_corda_covariance_file(Path(folder) / "covariance.pt", group_sums_from_statistics(stats))
        config = LoraConfig(init_lora_weights="corda",
                            corda_config=CordaConfig(corda_method=method, covariance_file=str(path)), **lora)
        preprocess_corda(model, config, run_model=None)  # None: PEFT must read the file, not run the model
    config.corda_config.covariance_file = None  # the temporary file is gone; keep no dangling path in the config
    return config


def _one_sequence_at_a_time(model: nn.Module, calibration: list[Mapping[str, torch.Tensor]]) -> Callable[[], None]:
    """CorDA's ``run_model``: every calibration row alone, its padding cut off.

    CorDA's hook squeezes the batch dimension and takes ``input.t()``: a batch of more than one
    sequence fails there, and padding tokens would be counted. Each call is also normalised by its
    own max, so one call per sequence is what CorDA's collection is written for.
    """
    device = _device(model)

    def run() -> None:
        for batch in calibration:
            ids, mask = batch["input_ids"], batch.get("attention_mask")
            for i in range(ids.shape[0]):
                row = ids[i] if mask is None else ids[i][mask[i].bool()]
                if row.numel():
                    model(input_ids=row[None].to(device), attention_mask=torch.ones_like(row)[None].to(device))

    return run


def save_adapter(peft_model: nn.Module, folder: str | Path, initial: str | Path | None = None) -> Path:
    """The trained adapter in ``folder``, loadable on the ORIGINAL base model.

    For a peer that rewrote the base weights (W ← W − s·B₀A₀), ``initial`` is the folder where its
    adapter was saved right after initialisation (:func:`save_initial_adapter`): PEFT's conversion writes
    ΔW = s(BA − B₀A₀) as a plain LoRA of rank 2r ([A; A₀], [B, −B₀]), so it applies to W itself.
    """
    options = {} if initial is None else {"path_initial_model_for_weight_conversion": str(initial)}
    return write_folder_whole(folder, lambda staging: peft_model.save_pretrained(str(staging), **options),
                              ADAPTER_FILES)


def save_initial_adapter(peft_model: nn.Module, folder: str | Path) -> Path:
    """The adapter as initialised, before any step: what :func:`save_adapter` subtracts for the conversion."""
    return write_folder_whole(folder, lambda staging: peft_model.save_pretrained(str(staging)), ADAPTER_FILES)

