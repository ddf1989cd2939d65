"""TsqLoRA's quality score: batched per-sample gradients and loss drops against loops of single-sample passes."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import random_batches, tiny_llama
from sensitivity_lora.training.per_sample import losses_after_steps, per_sample_gradients, sample_losses
from sensitivity_lora.training.quality import QualityConfig, chunks, normalise, score_candidates

torch.set_num_threads(1)


def lora_llama(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)  # random B: both A and B get gradients
    torch.manual_seed(seed)
    return get_peft_model(tiny_llama(seed), config).eval()


def labelled(batch: dict) -> dict:
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}


def rows(batch: dict, i: int) -> dict:
    return {k: v[i:i + 1] for k, v in batch.items()}


def loop_gradients(model, batch):
    """The reference: one forward and backward per row."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = []
    for i in range(batch["input_ids"].shape[0]):
        one = rows(batch, i)
        inputs = {k: v for k, v in one.items() if k != "labels"}
        loss = sample_losses(model, model(**inputs), one).sum()
        grads = torch.autograd.grad(loss, list(params.values()))
        out.append((float(loss), {n: g for n, g in zip(params, grads)}))
    return out


def loop_stepped_losses(model, batch, etas):
    """The reference of the exact Δℓ: each row's SGD step taken on the model, its loss, the step undone."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = []
    for i, (_, ref) in enumerate(loop_gradients(model, batch)):
        saved = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p -= etas[i] * ref[n]
            one = rows(batch, i)
            out.append(sample_losses(model, model(**{k: v for k, v in one.items() if k != "labels"}), one))
            for n, p in params.items():
                p.copy_(saved[n])
    return torch.cat(out)


def test_per_sample_gradients_equal_a_loop_of_single_sample_backward_passes():
    model = lora_llama()  # Llama's linears have no bias: biases are tested on BERT below
    batch = labelled(random_batches(1, batch=5, seq=10)[0])
    grads = per_sample_gradients(model, batch)
    reference = loop_gradients(model, batch)
    norms = grads.sq_norms()
    for i, (loss, ref) in enumerate(reference):
        assert grads.losses[i].item() == pytest.approx(loss, rel=1e-5)
        assert norms[i].item() == pytest.approx(sum(float(g.pow(2).sum()) for g in ref.values()), rel=1e-4)
    # every LoRA tensor's per-sample gradient of every row (padded or not), not only the norms
    for name, per in grads.weights.items():
        for i, (_, ref) in enumerate(reference):
            torch.testing.assert_close(per[i], ref[name + ".weight"], rtol=1e-4, atol=1e-6)
    gram = grads.gram()
    flat = [torch.cat([g.flatten() for g in ref.values()]) for _, ref in reference]
    torch.testing.assert_close(gram[0, 3], flat[0] @ flat[3], rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())  # no parameter's .grad was touched


def test_exact_loss_drop_equals_the_real_sgd_step_of_each_sample():
    model = lora_llama()
    batch = labelled(random_batches(1, batch=4, seq=10)[0])
    grads = per_sample_gradients(model, batch)
    etas = torch.tensor([0.05, 0.1, 0.2, 0.4])
    batched = losses_after_steps(model, batch, grads, etas)
    torch.testing.assert_close(batched, loop_stepped_losses(model, batch, etas), rtol=1e-5, atol=1e-6)


def test_first_order_loss_drop_is_eta_times_grad_norm_for_small_steps():
    model = lora_llama().double()  # fp64: the second-order remainder is far below rounding
    batch = labelled(random_batches(1, batch=3, seq=10)[0])
    grads = per_sample_gradients(model, batch)
    norms = grads.sq_norms()
    errors = {}
    for eta in (1.0, 1e-2, 1e-3):
        drop = grads.losses - losses_after_steps(model, batch, grads, torch.full((3,), eta, dtype=torch.float64))
        errors[eta] = (drop / (eta * norms) - 1).abs()
    # small steps: η‖∇ℓ‖² is the drop (the softmax's fp32 upcast in attention limits how close it gets);
    # a large step: the curvature the exact Δℓ adds shows
    assert torch.all(errors[1e-2] < 0.05) and torch.all(errors[1e-3] < 0.01), errors
    assert errors[1.0].max() > 0.3, errors


def test_score_candidates_terms_and_normalisation():
    model = lora_llama()
    data = labelled(random_batches(1, batch=7, seq=10)[0])
    make_batch = lambda idx: {k: v[list(idx)] for k, v in data.items()}  # noqa: E731
    model.train()
    terms = score_candidates(model, make_batch, list(range(7)), QualityConfig(chunk_size=4))
    assert model.training  # the mode is restored
    assert terms.step_size > 0 and len(terms.indices) == 7
    q = terms.score((1.0, 1.0, 1.0))
    assert q.shape == (7,) and torch.isfinite(q).all()
    z = normalise(terms.grad_sq)
    assert abs(float(z.mean())) < 1e-9 and float(z.pow(2).mean()) == pytest.approx(1.0)
    assert normalise(torch.ones(5)).abs().max() == 0
    # first-order Δℓ is an affine image of ‖∇ℓ‖²: normalised, the two are the same term
    first = score_candidates(model, make_batch, list(range(7)), QualityConfig(chunk_size=4, delta_loss="first-order"))
    torch.testing.assert_close(normalise(first.delta_loss), normalise(first.grad_sq))
    assert [len(c) for c in chunks(list(range(17)), 16)] == [9, 8]


@pytest.mark.parametrize("bad", [{"alphas": (1, 2)}, {"temperature": 0}, {"refresh_every": 0},
                                 {"pool_size": 0}, {"step_size": -1.0}, {"delta_loss": "second"}])
def test_quality_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        QualityConfig(**bad)
    assert QualityConfig(temperature=math.inf).temperature == math.inf


def test_per_sample_gradients_of_a_classifier_with_a_trainable_head():
    from peft import LoraConfig, get_peft_model

    from conftest import tiny_bert
    from sensitivity_lora.evaluation.classification import MeanPoolClassifier

    torch.manual_seed(0)
    model = get_peft_model(MeanPoolClassifier(tiny_bert(), 3), LoraConfig(r=2, target_modules=["query", "value"],
                                                                         init_lora_weights=False)).eval()
    for p in model.base_model.model.head.parameters():
        p.requires_grad_(True)  # weight and bias: per-sample gradients of both
    batch = {**random_batches(1, batch=4, seq=8)[0], "labels": torch.tensor([0, 2, 1, 2])}
    grads = per_sample_gradients(model, batch)
    assert any(name.endswith("head") for name in grads.biases)
    norms = grads.sq_norms()
    for i, (loss, ref) in enumerate(loop_gradients(model, batch)):
        assert grads.losses[i].item() == pytest.approx(loss, rel=1e-5)
        assert norms[i].item() == pytest.approx(sum(float(g.pow(2).sum()) for g in ref.values()), rel=1e-4)
    # the exact step with per-row head weights and biases, against the step taken row by row
    etas = torch.full((4,), 0.3)
    batched = losses_after_steps(model, batch, grads, etas)
    torch.testing.assert_close(batched, loop_stepped_losses(model, batch, etas), rtol=1e-5, atol=1e-6)
    model.base_model.model.encoder.embeddings.LayerNorm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="nn.Linear parameters"):
        per_sample_gradients(model, batch)


def test_exact_loss_drop_when_only_a_bias_of_a_layer_trains():
    from peft import LoraConfig, get_peft_model

    from conftest import tiny_bert
    from sensitivity_lora.evaluation.classification import MeanPoolClassifier

    torch.manual_seed(1)
    model = get_peft_model(MeanPoolClassifier(tiny_bert(), 2), LoraConfig(r=2, target_modules=["query"],
                                                                         bias="lora_only", init_lora_weights=False))
    model.eval()
    batch = {**random_batches(1, batch=3, seq=8)[0], "labels": torch.tensor([0, 1, 1])}
    grads = per_sample_gradients(model, batch)
    assert any(name.endswith("base_layer") for name in grads.biases)  # the query layers' own biases
    batched = losses_after_steps(model, batch, grads, torch.full((3,), 0.2))
    torch.testing.assert_close(batched, loop_stepped_losses(model, batch, torch.full((3,), 0.2)), rtol=1e-5, atol=1e-6)


def test_a_trainable_linear_the_forward_never_calls_has_a_zero_per_sample_gradient():
    from peft import LoraConfig, get_peft_model

    from conftest import tiny_bert
    from sensitivity_lora.evaluation.classification import MeanPoolClassifier

    torch.manual_seed(2)
    model = get_peft_model(MeanPoolClassifier(tiny_bert(), 3), LoraConfig(r=2, target_modules=["query"],
                                                                         init_lora_weights=False)).eval()
    batch = {**random_batches(1, batch=3, seq=8)[0], "labels": torch.tensor([0, 2, 1])}
    before = per_sample_gradients(model, batch)
    model.base_model.model.spare = torch.nn.Linear(4, 4)  # trainable, never called (an unused branch, an idle expert)
    after = per_sample_gradients(model, batch)
    assert not any("spare" in name for name in after.weights)
    torch.testing.assert_close(after.sq_norms(), before.sq_norms(), rtol=0, atol=0)
    torch.testing.assert_close(losses_after_steps(model, batch, after, torch.full((3,), 0.2)),
                               losses_after_steps(model, batch, before, torch.full((3,), 0.2)), rtol=0, atol=0)


def test_which_models_shift_their_token_labels():
    from types import SimpleNamespace

    from sensitivity_lora.training.per_sample import is_causal_lm

    def model(name: str, encoder_decoder: bool | None = None):
        cls = type(name, (torch.nn.Module,), {})
        m = cls()
        if encoder_decoder is not None:
            m.config = SimpleNamespace(is_encoder_decoder=encoder_decoder)
        return m

    assert is_causal_lm(model("LlamaForCausalLM")) and is_causal_lm(model("GPT2LMHeadModel"))
    assert is_causal_lm(model("LlavaForConditionalGeneration", encoder_decoder=False))  # decoder-only VLM
    assert not is_causal_lm(model("T5ForConditionalGeneration", encoder_decoder=True))
    assert not is_causal_lm(model("WhisperForConditionalGeneration"))  # no config: not assumed decoder-only
    assert not is_causal_lm(model("BertForSequenceClassification", encoder_decoder=False))
