"""The field's LoRA initialisations in the harness (evaluation/peers.py), built by PEFT, on tiny random models."""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch

pytest.importorskip("peft")

from conftest import random_batches, tiny_bert, tiny_llama  # noqa: E402
from sensitivity_lora.evaluation.budget import lora_params, target_dims  # noqa: E402
from sensitivity_lora.evaluation.finetune import TrainConfig, train  # noqa: E402
from sensitivity_lora.evaluation.methods import METHODS, build_adapted  # noqa: E402

PEERS = ("pissa", "olora", "rslora", "loraga", "corda-ipm", "corda-kpm", "corda-ipm-cov")
REWRITING = ("pissa", "olora", "loraga", "corda-ipm", "corda-kpm", "corda-ipm-cov")  # W ← W − s·BA
RANK = 3  # r̄; lora_alpha = 2 r̄ as in every method


pytestmark = pytest.mark.usefixtures("one_thread")


def build(base, name, calibration, **kwargs):
    """(the wrapped copy, its Adapted): build_adapted on a fresh copy, as the harness does."""
    torch.manual_seed(0)
    model = copy.deepcopy(base)
    return model, build_adapted(model, METHODS[name], RANK, calibration, 10, **kwargs)


def lora_layer(model, target):
    return dict(model.named_modules())[target]


def delta(layer):
    """s·B·A of a LoRA layer."""
    return (layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()


def lm_labels(batch):
    return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}


@pytest.mark.parametrize("name", PEERS)
def test_peer_gives_every_target_rank_rbar_and_trains_only_lora(name):
    from peft.tuners.lora import LoraLayer

    base, calibration = tiny_llama(), random_batches()
    model, adapted = build(base, name, calibration, task_type="CAUSAL_LM")
    assert METHODS[name].kind == "peer"
    assert len(adapted.targets) == 14  # 2 blocks × 7 linear layers
    assert adapted.ranks() == {t: RANK for t in adapted.targets}
    assert adapted.rewrites_base == (name in REWRITING)
    for t in adapted.targets:
        layer = lora_layer(model, t)
        assert isinstance(layer, LoraLayer)
        assert layer.lora_A["default"].weight.shape == (RANK, layer.in_features)
        # rsLoRA's scale is α/√r, everyone else's α/r
        assert layer.scaling["default"] == pytest.approx(2 * RANK / (math.sqrt(RANK) if name == "rslora" else RANK))

    trainable = {n: p for n, p in adapted.peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(r"\.lora_[AB]\.default\.weight$", n) for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == lora_params(adapted.ranks(),
                                                                      target_dims(model, adapted.targets))
    # no gradient left over (LoRA-GA's gradient pass), the base model back in eval mode
    assert all(p.grad is None for p in adapted.peft_model.parameters())
    assert not model.training
    assert not any(m.training for n, m in model.named_modules() if ".lora_" not in n and not isinstance(m, LoraLayer))

    frozen = {n: p.detach().clone() for n, p in adapted.peft_model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    data = lm_labels(random_batches(1, 8, 12, seed=5)[0])
    log = train(adapted.peft_model, lambda idx: {k: v[idx] for k, v in data.items()}, 8,
                TrainConfig(steps=2, batch_size=4, lr=1e-3), forward=adapted.forward)
    assert len(log.losses) == 2 and all(math.isfinite(x) for x in log.losses)
    assert any(not torch.equal(p, before[n]) for n, p in trainable.items())
    assert all(torch.equal(p, frozen[n]) for n, p in adapted.peft_model.named_parameters() if n in frozen)


@pytest.mark.parametrize("name", PEERS)
def test_step_zero_output_is_the_base_models(name):
    base, calibration = tiny_llama(), random_batches()
    model, adapted = build(base, name, calibration, task_type="CAUSAL_LM")
    batch = random_batches(1, 4, 12, seed=9)[0]
    with torch.no_grad():
        reference = base(**batch).logits
        out = adapted.peft_model(**batch).logits
    assert torch.allclose(out, reference, atol=1e-5 * float(reference.abs().max()))
    originals = dict(base.named_modules())
    for t in adapted.targets:
        layer, weight = lora_layer(model, t), originals[t].weight.detach()
        residual = layer.get_base_layer().weight
        if name in REWRITING:
            # a non-zero adapter, and the residual base weight that cancels it: W_res + s·BA = W
            assert float(delta(layer).abs().max()) > 1e-3 * float(weight.abs().max()), t
            assert torch.allclose(residual + delta(layer), weight, atol=1e-5 * float(weight.abs().max())), t
        else:  # rsLoRA: plain LoRA's B = 0, the base weight untouched
            assert torch.equal(residual, weight) and not layer.lora_B["default"].weight.any(), t


def test_loraga_aligns_with_the_mean_calibration_gradient():
    """PEFT's LoRA-GA (direction ArB2r, "stable" scale): A = the top r right singular vectors of the
    gradient averaged over the calibration batches, B = the next r left ones × σ · d_out^¼ / √γ."""
    base, calibration = tiny_llama(), random_batches()
    model, adapted = build(base, "loraga", calibration, task_type="CAUSAL_LM")
    reference = copy.deepcopy(base)
    for batch in calibration:
        reference(**lm_labels(batch)).loss.backward()
    gamma = 16  # LoraGAConfig().stable_gamma
    for t in adapted.targets:
        grad = lora_layer(reference, t).weight.grad / len(calibration)
        sigma = torch.linalg.svdvals(grad)
        layer = lora_layer(model, t)
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        assert torch.allclose(a @ a.T, torch.eye(RANK), atol=1e-5)
        captured = (grad @ a.T).pow(2).sum() / sigma[:RANK].pow(2).sum()
        assert float(captured) == pytest.approx(1.0, abs=1e-3), t  # a random A would capture ~r/d_in
        expected = sigma[RANK:2 * RANK] * layer.out_features ** 0.25 / math.sqrt(gamma)
        assert torch.allclose(b.norm(dim=0), expected, rtol=1e-2), t  # the mean, not the sum, of the gradients


def test_corda_from_the_package_covariance_matches_peft_collection_up_to_its_normalisation():
    """One unpadded sequence: PEFT's covariance is XᵀX / max(X)², the package's XᵀX / T, so f = T / max(X)²
    per module. B·A, the residual and the subspaces agree; A is √f larger and B √f smaller with the file."""
    base = tiny_llama()
    calibration = random_batches(1, 1, 100, pad=False)
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: inputs.__setitem__(n, args[0].detach()[0]))
             for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    with torch.no_grad():
        base(**calibration[0])
    for h in hooks:
        h.remove()
    own_model, own = build(base, "corda-ipm", calibration, task_type="CAUSAL_LM")
    cov_model, cov = build(base, "corda-ipm-cov", calibration, task_type="CAUSAL_LM")
    kpm_model, _ = build(base, "corda-kpm", calibration, task_type="CAUSAL_LM")
    for t in own.targets:
        mine, theirs = lora_layer(cov_model, t), lora_layer(own_model, t)
        d_mine, d_theirs = delta(mine), delta(theirs)
        # fp32 inverse of an ill-conditioned covariance (o_proj: GQA outputs) leaves up to ~2e-4 relative
        assert torch.allclose(d_mine, d_theirs, atol=2e-3 * float(d_theirs.abs().max())), t
        assert torch.allclose(mine.get_base_layer().weight, theirs.get_base_layer().weight, atol=1e-4), t
        a_mine, a_theirs = mine.lora_A["default"].weight.detach(), theirs.lora_A["default"].weight.detach()
        q_mine, q_theirs = torch.linalg.qr(a_mine.T)[0], torch.linalg.qr(a_theirs.T)[0]
        assert float(torch.linalg.svdvals(q_mine.T @ q_theirs).min()) == pytest.approx(1.0, abs=1e-4), t
        x = inputs[t]
        f = x.shape[0] / float(x.max()) ** 2  # CorDA divides by max(X) (signed), not max |X|
        assert float(a_mine.norm() / a_theirs.norm()) == pytest.approx(math.sqrt(f), rel=1e-3), t
        b_mine, b_theirs = mine.lora_B["default"].weight.detach(), theirs.lora_B["default"].weight.detach()
        assert float(b_theirs.norm() / b_mine.norm()) == pytest.approx(math.sqrt(f), rel=1e-3), t
        # KPM keeps the other end of the same SVD: a different adapter
        d_kpm = delta(lora_layer(kpm_model, t))
        assert not torch.allclose(d_kpm, d_theirs, atol=1e-2 * float(d_theirs.abs().max())), t


def test_corda_covariance_sources_differ_with_several_sequences():
    """Several sequences: CorDA weights each by 1 / max(X_c)², the package's Σxxᵀ/n by its token count,
    so the two adapters are no longer the same (nothing exact holds between them)."""
    base, calibration = tiny_llama(), random_batches(4, 4, 60)
    own_model, own = build(base, "corda-ipm", calibration, task_type="CAUSAL_LM")
    cov_model, _ = build(base, "corda-ipm-cov", calibration, task_type="CAUSAL_LM")
    gaps = []
    for t in own.targets:
        d_own, d_cov = delta(lora_layer(own_model, t)), delta(lora_layer(cov_model, t))
        gaps.append(float((d_own - d_cov).abs().max() / d_own.abs().max()))
    assert max(gaps) > 1e-2


# ------------------------------------------------------------------ classification: a tiny BERT with a head


def classifier():
    from sensitivity_lora.evaluation.classification import MeanPoolClassifier

    torch.manual_seed(3)
    return MeanPoolClassifier(tiny_bert(), 2).eval()


@pytest.mark.parametrize("name", ["loraga", "corda-ipm", "corda-kpm", "corda-ipm-cov"])
def test_classifier_peers_keep_the_step_zero_output(name):
    base = classifier()
    calibration = random_batches(3, 4, 12)
    labels = [torch.tensor([0, 1, 1, 0]) for _ in calibration]
    model, adapted = build(base, name, calibration, calibration_labels=labels)
    assert len(adapted.targets) == 12 and not any("head" in t for t in adapted.targets)
    assert adapted.ranks() == {t: RANK for t in adapted.targets}
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    batch = random_batches(1, 4, 12, seed=9)[0]
    with torch.no_grad():  # BERT has dropout: equal outputs also say both are in eval mode
        reference = base(**batch).logits
        out = adapted.peft_model(**batch).logits
    assert torch.allclose(out, reference, atol=1e-5 * float(reference.abs().max()))


def test_loraga_needs_labels_for_a_classifier():
    with pytest.raises(ValueError, match="loraga needs labelled calibration batches"):
        build(classifier(), "loraga", random_batches(2, 4, 12))


@pytest.mark.parametrize("name", ["pissa", "olora", "loraga", "corda-ipm", "uniform"])
def test_a_saved_adapter_loads_on_the_original_base_and_gives_the_trained_model(tmp_path, name):
    from peft import PeftModel

    from sensitivity_lora.evaluation.peers import save_adapter, save_initial_adapter

    base = tiny_llama(seed=4)
    original = copy.deepcopy(base)
    batches = random_batches(n_batches=2, batch=4, seq=10, seed=5)
    adapted = build_adapted(base, METHODS[name], RANK, batches, total_steps=3, task_type="CAUSAL_LM")
    initial = save_initial_adapter(adapted.peft_model, tmp_path / "initial") if adapted.rewrites_base else None
    data = {k: torch.cat([b[k] for b in batches]) for k in ("input_ids", "attention_mask")}
    data["labels"] = data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
    train(adapted.peft_model, lambda idx: {k: v[idx] for k, v in data.items()}, 8,
          TrainConfig(steps=3, batch_size=4, lr=5e-2, warmup_steps=1, seed=0), forward=adapted.forward)
    save_adapter(adapted.peft_model, tmp_path / "trained", initial)
    loaded = PeftModel.from_pretrained(original, str(tmp_path / "trained")).eval()
    with torch.no_grad():
        inputs = {k: data[k] for k in ("input_ids", "attention_mask")}
        trained_logits = adapted.peft_model.eval()(**inputs).logits
        loaded_logits = loaded(**inputs).logits
        untrained_logits = tiny_llama(seed=4)(**inputs).logits
    torch.testing.assert_close(loaded_logits, trained_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(trained_logits, untrained_logits, atol=1e-3)  # training moved it
