"""Per-sample losses and per-sample gradients of the trainable linear layers, in one batched pass.

Why not ``torch.func`` (vmap over ``grad`` with ``functional_call``): vmap must trace the
whole model, and Hugging Face models build masks, cache objects and in-place updates that
vmap often refuses; it also computes the frozen base model's per-sample work N times over.
Instead this uses the structure every LoRA parameter has: it is the weight of an
``nn.Linear`` (lora_A: d_in → r, lora_B: r → d_out), and for a linear layer y = x Wᵀ + b
the gradient of Σ_n ℓ_n with respect to W splits exactly by sample,

    ∇_W ℓ_n = Σ_t g_{n,t} x_{n,t}ᵀ,   ∇_b ℓ_n = Σ_t g_{n,t},   g = ∂(Σ_m ℓ_m)/∂y,

because sample n's loss depends only on sample n's activations (no batch statistics in a
transformer). So one ordinary forward, one ``torch.autograd.grad`` with respect to the
captured layer outputs (no parameter's ``.grad`` is touched), and one einsum per layer give
every sample's gradient; for LoRA the per-sample tensors are small (r · (d_in + d_out) each).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

SampleLossFn = Callable[[nn.Module, Any, Mapping[str, torch.Tensor]], torch.Tensor]


def trainable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` with a trainable weight or bias; an error if any other parameter is trainable
    (its per-sample gradient would need a rule this module does not have)."""
    found: dict[str, nn.Linear] = {}
    covered: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            params = [p for p in (module.weight, module.bias) if p is not None and p.requires_grad]
            if params:
                found[name] = module
                covered |= {id(p) for p in params}
    other = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if other:
        raise ValueError(f"per-sample gradients are computed for nn.Linear parameters (LoRA A/B, linear heads) only; "
                         f"{len(other)} other trainable parameters (first: {other[0]}): freeze them or train them "
                         "without the quality score")
    if not found:
        raise ValueError("the model has no trainable linear layer: build the LoRA adapter first")
    return found


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 up to fp32 for the sums here; fp64 stays fp64."""
    return t if t.dtype == torch.float64 else t.float()


def is_causal_lm(model: nn.Module) -> bool:
    """Whether token labels are shifted by one: a decoder-only language model (``*ForCausalLM``, ``*LMHeadModel``,
    and decoder-only ``*ForConditionalGeneration`` such as vision-language models), not a seq2seq model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    if "CausalLM" in name or "LMHead" in name:
        return True
    config = getattr(base, "config", None)
    return "ForConditionalGeneration" in name and not getattr(config, "is_encoder_decoder", True)


def sample_losses(model: nn.Module, output: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """ℓ(x) of every row of the batch: the mean token cross-entropy of that row (shifted by one for a
    causal LM, labels −100 ignored), the cross-entropy of a sequence label, or the squared error of a
    regression target. Pass your own function of (model, output, batch) for anything else."""
    if "labels" not in batch:
        raise ValueError("per-sample losses need labelled batches: the batch has no 'labels'")
    logits, labels = output.logits, batch["labels"].to(output.logits.device)
    if logits.dim() == 3 and labels.dim() == 2 and labels.shape == logits.shape[:2]:
        if is_causal_lm(model):
            logits, labels = logits[:, :-1], labels[:, 1:]
        tokens = F.cross_entropy(at_least_fp32(logits.reshape(-1, logits.shape[-1])), labels.reshape(-1),
                                 ignore_index=-100, reduction="none").view(labels.shape)
        mask = labels != -100
        return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)
    if logits.dim() == 2 and labels.dim() == 1:
        if logits.shape[-1] == 1 and labels.is_floating_point():
            return (at_least_fp32(logits.squeeze(-1)) - labels.to(logits.dtype)) ** 2
        return F.cross_entropy(at_least_fp32(logits), labels, reduction="none")
    raise ValueError(f"no default per-sample loss for logits of shape {tuple(logits.shape)} and labels of shape "
                     f"{tuple(labels.shape)}: pass loss_fn=(model, output, batch) -> one loss per row")


@dataclass
class PerSampleGradients:
    """The per-sample losses ℓ_n and gradients ∇ℓ_n of one batch, per trainable linear layer."""

    losses: torch.Tensor  # [N]
    weights: dict[str, torch.Tensor]  # layer name -> [N, d_out, d_in]
    biases: dict[str, torch.Tensor]  # layer name -> [N, d_out] (trainable biases only)

    def tensors(self) -> list[torch.Tensor]:
        return list(self.weights.values()) + list(self.biases.values())

    def sq_norms(self) -> torch.Tensor:
        """‖∇ℓ_n‖² over all trainable parameters, [N] (on the losses' device: a sharded model's layers differ)."""
        return sum(t.flatten(1).pow(2).sum(1).to(self.losses.device) for t in self.tensors())

    def gram(self) -> torch.Tensor:
        """⟨∇ℓ_n, ∇ℓ_m⟩ for every pair, [N, N]."""
        return sum((t.flatten(1) @ t.flatten(1).T).to(self.losses.device) for t in self.tensors())


def _model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}  # the losses are computed here, per row


def per_sample_gradients(model: nn.Module, batch: Mapping[str, torch.Tensor],
                         loss_fn: SampleLossFn | None = None) -> PerSampleGradients:
    """ℓ_n and ∇ℓ_n for every row n of ``batch`` (with ``labels``), in one forward and one backward.

    The model runs as it is (call ``model.eval()`` first for a measurement without dropout).
    Parameters' ``.grad`` are left untouched.
    """
    layers = trainable_linears(model)
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in layers}

    def capture(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            calls[name].append((inputs[0].detach(), output))
        return hook

    handles = [m.register_forward_hook(capture(n)) for n, m in layers.items()]
    try:
        with torch.enable_grad():
            output = model(**_model_inputs(batch))
            losses = (loss_fn or sample_losses)(model, output, batch)
            outputs = [y for name in layers for _, y in calls[name]]
            if not outputs:
                raise ValueError("no trainable linear layer was called by the model's forward on this batch")
            if not all(y.requires_grad for y in outputs):
                raise ValueError("a trainable layer's output does not require grad: is the model under torch.no_grad?")
            grads = iter(torch.autograd.grad(losses.sum(), outputs, allow_unused=True))
    finally:
        for h in handles:
            h.remove()
    n = losses.shape[0]
    weights, biases = {}, {}
    for name, module in layers.items():
        if not calls[name]:  # not called on this batch (an inactive branch, an expert with no tokens): ∇ = 0
            continue
        xs, gs = [], []
        for x, y in calls[name]:
            g = next(grads)
            g = torch.zeros_like(y) if g is None else g
            xs.append(_by_sample(x, n, name))
            gs.append(_by_sample(g, n, name))
        x, g = at_least_fp32(torch.cat(xs, 1)), at_least_fp32(torch.cat(gs, 1))  # a layer called twice: its tokens add up
        if module.weight.requires_grad:
            weights[name] = torch.einsum("nto,nti->noi", g, x)
        if module.bias is not None and module.bias.requires_grad:
            biases[name] = g.sum(1)
    return PerSampleGradients(at_least_fp32(losses.detach()), weights, biases)


def _by_sample(t: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """[N, tokens, features] view of a layer's input or output-gradient."""
    if t.dim() < 2 or t.shape[0] != n:
        raise ValueError(f"{name}: its input has shape {tuple(t.shape)}, whose first dimension is not the batch ({n})")
    return t.reshape(n, -1, t.shape[-1])


def losses_after_steps(model: nn.Module, batch: Mapping[str, torch.Tensor], grads: PerSampleGradients,
                       step_sizes: torch.Tensor, loss_fn: SampleLossFn | None = None) -> torch.Tensor:
    """ℓ_n(θ − η_n ∇ℓ_n) for every row n at once: one batched forward in which every trainable linear
    layer applies row n's own stepped weights (W − η_n ∇_W ℓ_n), under no_grad."""
    layers = trainable_linears(model)
    n = grads.losses.shape[0]
    eta = step_sizes.reshape(n)

    def stepped(name: str) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            x = at_least_fp32(_by_sample(inputs[0], n, name))
            weight = at_least_fp32(module.weight)
            if name in grads.weights:  # row n's own weight
                y = torch.einsum("nti,noi->nto", x, weight - eta.to(x)[:, None, None] * grads.weights[name].to(x))
            else:  # only the bias trains: the weight is shared
                y = x @ weight.T
            if module.bias is not None:
                bias = at_least_fp32(module.bias).unsqueeze(0)
                if name in grads.biases:
                    bias = bias - eta.to(x)[:, None] * grads.biases[name].to(x)
                y = y + bias[:, None, :]
            return y.reshape(output.shape).to(output.dtype)
        return hook

    handles = [m.register_forward_hook(stepped(n_)) for n_, m in layers.items()]
    try:
        with torch.no_grad():
            output = model(**_model_inputs(batch))
            return at_least_fp32((loss_fn or sample_losses)(model, output, batch))
    finally:
        for h in handles:
            h.remove()
