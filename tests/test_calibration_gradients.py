"""The one-pass gradient collection (calibration/gradients.py): each target's mean-loss gradient and, from the
same forward, its input group's Σxxᵀ; the model as it was afterwards, also after an error."""
from __future__ import annotations

import pytest
import torch

import sensitivity_lora
from conftest import random_batches, tiny_gpt2, tiny_llama
from sensitivity_lora.calibration import resolve_targets
from sensitivity_lora.calibration.gradients import causal_lm_labels, gradient_statistics


def targets_of(model):
    return resolve_targets(model)


def direct_gradients(model, batches, labels):
    names = targets_of(model)
    weights = [model.get_submodule(n).weight for n in names]
    loss = sum(model(**b, labels=l).loss for b, l in zip(batches, labels)) / len(batches)
    return dict(zip(names, torch.autograd.grad(loss, weights)))


def seq_cls_llama():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, num_labels=3,
                      pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "classifier"])
def test_gradients_equal_autograd_of_the_mean_loss(kind):
    model = {"llama": tiny_llama, "gpt2": tiny_gpt2, "classifier": seq_cls_llama}[kind]()
    batches = random_batches(n_batches=3, seq=10, vocab=128)
    if kind == "classifier":
        labels = [torch.tensor([0, 2, 1, 1]), torch.tensor([2, 2, 0, 1]), torch.tensor([1, 0, 0, 2])]
        result = gradient_statistics(model, batches, labels=labels)
    else:
        labels = [causal_lm_labels(b) for b in batches]
        result = gradient_statistics(model, batches)
    expected = direct_gradients(model, batches, labels)
    assert list(result.gradients) == list(expected)
    for name, grad in expected.items():
        module = model.get_submodule(name)
        layout = grad if isinstance(module, torch.nn.Linear) else grad.T  # Conv1D: (d_in, d_out) stored
        assert result.gradients[name].shape == layout.shape
        torch.testing.assert_close(result.gradients[name], layout, rtol=1e-5, atol=1e-7)
        assert float(layout.abs().max()) > 0
    assert result.n_batches == 3


@pytest.mark.parametrize("backend", [None, "reference"])  # the reference kernels are autograd-visible torch ops
def test_the_pass_statistics_equal_the_calibration_statistics(backend):
    model = tiny_llama()
    batches = random_batches(n_batches=3, seq=12)
    ours = gradient_statistics(model, batches, backend=backend).statistics
    theirs = sensitivity_lora.calibrate(model, batches, hessian="full", progress=False)
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert real_tokens < sum(b["input_ids"].numel() for b in batches)  # there is padding to exclude
    assert {g: s.members for g, s in ours.groups.items()} == {g: s.members for g, s in theirs.groups.items()}
    assert len(ours.groups) < len(ours.dims)  # q/k/v and gate/up share their inputs
    for name, group in ours.groups.items():
        assert group.n_tokens == theirs.groups[name].n_tokens == real_tokens
        torch.testing.assert_close(group.raw_xtx(), theirs.groups[name].raw_xtx(), rtol=1e-6, atol=1e-8)
        assert not group.raw_xtx().requires_grad


def model_snapshot(model):
    return {
        "values": {n: p.detach().clone() for n, p in model.named_parameters()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()},
    }


def assert_same_model(model, before):
    after = model_snapshot(model)
    assert after["flags"] == before["flags"]
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    for n, grad in before["grads"].items():
        assert after["grads"][n] is grad, n
    for n, value in before["values"].items():
        assert torch.equal(after["values"][n], value), n


def prepared_model():
    """Train mode, mixed requires_grad flags and leftover .grad tensors: all must survive the pass."""
    model = tiny_llama()
    model.train()
    model.model.layers[0].eval()
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)  # a target that does not require grad
    model.model.layers[0].self_attn.q_proj.weight.grad = torch.ones_like(model.model.layers[0].self_attn.q_proj.weight)
    model.lm_head.weight.grad = torch.full_like(model.lm_head.weight, 2.0)
    return model


def test_the_pass_leaves_the_model_as_it_was():
    model = prepared_model()
    before = model_snapshot(model)
    result = gradient_statistics(model, random_batches(n_batches=2))
    assert_same_model(model, before)
    assert float(result.gradients["model.layers.1.mlp.up_proj"].abs().max()) > 0  # its flag was False


def test_an_error_mid_pass_leaves_the_model_as_it_was():
    model = prepared_model()
    calls = []

    def fail_on_second_batch(module, args, output):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")

    handle = model.model.layers[1].mlp.register_forward_hook(fail_on_second_batch)
    before = model_snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        gradient_statistics(model, random_batches(n_batches=3))
    assert len(calls) == 2  # the first batch's backward had run
    assert_same_model(model, before)
    handle.remove()
