"""HyperAdaLoRA: the generator's shapes and size, where gradients go, the budget schedule and its exact end."""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import random_batches, tiny_gpt2, tiny_llama
from sensitivity_lora.calibration.targets import module_dims, resolve_targets
from sensitivity_lora.hyperadalora import HyperAdaLoraConfig, RankAllocator, get_hyperadalora_model


def train_steps(model, steps: int, lr: float = 1e-2, seed: int = 1) -> list[float]:
    """``steps`` AdamW steps on random tokens, pruning after each; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    batches = random_batches(n_batches=2, seed=seed)
    model.train()
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_generated_shapes_per_module(make):
    base = make()
    dims = {n: module_dims(base.get_submodule(n)) for n in resolve_targets(base)}  # before wrapping
    model = get_hyperadalora_model(base, avg_rank=4, total_steps=20, chunk_size=8)  # chunks that do not divide d
    generated = model.generate_updates()
    assert list(generated) == model.targets == list(dims) and len(dims) >= 8
    for name, (p, lam, q) in generated.items():
        d_in, d_out = dims[name]
        assert tuple(p.shape) == (d_out, 6) and tuple(lam.shape) == (6,) and tuple(q.shape) == (6, d_in), name
        assert torch.count_nonzero(lam) == 0  # Λ starts at 0: the adapted model starts as the base model
    counts = model.parameter_counts()
    assert counts["generated"] == sum(6 * (i + o + 1) for i, o in dims.values())
    print(f"{make.__name__}: hypernetwork {counts['hypernetwork']} parameters, generates {counts['generated']}, "
          f"LoRA at r̄ {counts['lora_at_target_rank']}")


def test_the_adapted_model_starts_as_the_base_model():
    batch = random_batches(1)[0]
    expected = tiny_llama()(**batch).logits
    model = get_hyperadalora_model(tiny_llama(), avg_rank=2, total_steps=20)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)


def test_the_hypernetwork_is_small_against_what_it_writes_at_scale():
    """At a SmolLM2-135M-like shape (30 blocks of 7 linears) the default generator is a few % of the P, Λ, Q."""
    from sensitivity_lora.hyperadalora.hypernet import HyperNetwork, ModuleSpec

    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    specs = [ModuleSpec(f"l{i}.m{k}", i, k, d_in, d_out) for i in range(30) for k, (d_in, d_out) in enumerate(shapes)]
    net = HyperNetwork(specs, HyperAdaLoraConfig(avg_rank=8, total_steps=100), stats=None)
    assert net.num_parameters() < 0.1 * net.num_generated()


def test_gradients_reach_the_hypernetwork_and_not_the_generated_tensors():
    model = get_hyperadalora_model(tiny_llama(), avg_rank=2, total_steps=20)
    train_steps(model, 2)  # Λ moves off 0, so P and Q get gradient too
    model.train()
    batch = random_batches(1)[0]
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("hypernet.") for n in trainable)
    assert all(p.grad is not None for p in trainable.values())
    for part in ("codes", "encoder", "p_head", "q_head", "lambda_head", "layer_emb", "kind_emb"):
        assert any(p.grad.abs().sum() > 0 for n, p in trainable.items() if f".{part}" in n), part
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("hypernet."))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reading .grad of a non-leaf warns: that it is None is the point
        for p, lam, q in model._current.values():
            for t in (p, lam, q):
                assert not t.is_leaf and t.requires_grad and t.grad is None


def test_budget_schedule_is_adalora_s():
    config = HyperAdaLoraConfig(avg_rank=4, total_steps=100, init_rank=6, tinit=10, tfinal=20, delta_t=5)
    alloc = RankAllocator([f"m{i}" for i in range(3)], config)
    budgets = [alloc.budget_schedule(s)[0] for s in range(100)]
    assert budgets[:11] == [18] * 11 and budgets[80:] == [12] * 20
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    t = 40  # the cubic: ⌊(b₀ − b_T)(1 − (t − tinit)/(T − tfinal − tinit))³ + b_T⌋
    assert budgets[t] == int(6 * (1 - (t - 10) / 70) ** 3 + 12)
    assert [s for s in range(11, 80) if alloc.budget_schedule(s)[1]] == list(range(15, 80, 5))


def test_masks_keep_exactly_the_top_scores_with_ties_broken_in_order():
    config = HyperAdaLoraConfig(avg_rank=1, total_steps=10, init_rank=3, tinit=1, tfinal=1)
    alloc = RankAllocator(["a", "b"], config)
    masks = {"a": torch.ones(3), "b": torch.ones(3)}
    alloc.mask_to_budget(masks, 2)  # no scores yet: all tie, the first two in order
    assert masks["a"].tolist() == [1, 1, 0] and masks["b"].tolist() == [0, 0, 0]
    for name, s in (("a", [0.1, 0.0, 0.5]), ("b", [0.5, 0.9, 0.0])):  # Λ scores only (P, Q zero)
        alloc._ema_ipt[name] = [torch.zeros(4, 3), torch.tensor(s), torch.zeros(3, 5)]
        alloc._ema_unc[name] = [torch.zeros(4, 3), torch.ones(3), torch.zeros(3, 5)]
    alloc.mask_to_budget(masks, 3)
    assert masks["a"].tolist() == [0, 0, 1] and masks["b"].tolist() == [1, 1, 0]
    with pytest.raises(ValueError, match="budget 7 outside"):
        alloc.mask_to_budget(masks, 7)


def test_budget_after_pruning_is_exact_and_equal_to_the_other_methods():
    model = get_hyperadalora_model(tiny_llama(), avg_rank=2, total_steps=16, tinit=2, tfinal=4, delta_t=2)
    n = len(model.targets)
    seen = []
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = random_batches(1)[0]
    model.train()
    for step in range(16):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        budget = model.update_and_allocate(step)
        opt.zero_grad()
        kept = sum(model.ranks().values())
        seen.append(kept)
        if step <= 2:
            assert kept == 3 * n  # init_rank ⌈1.5 · 2⌉ = 3 everywhere during warm-up
        if step % 2 == 0 or step >= 12:
            assert kept == budget
    assert model.allocator.final and seen[-1] == 2 * n == sum(model.ranks().values())
    assert all(a >= b for a, b in zip(seen, seen[1:]))
    assert len(set(model.ranks().values())) > 1  # the ranks were allocated, not spread evenly


def test_importance_comes_from_the_generated_tensors_gradients():
    model = get_hyperadalora_model(tiny_llama(), avg_rank=2, total_steps=20)
    train_steps(model, 3)
    scores = model.allocator.triplet_scores()
    assert set(scores) == set(model.targets)
    assert all(torch.isfinite(s).all() and (s >= 0).all() for s in scores.values())
    assert sum(float(s.sum()) for s in scores.values()) > 0


def test_orthogonality_penalty_is_in_the_training_loss_only():
    model = get_hyperadalora_model(tiny_llama(), avg_rank=2, total_steps=20, orth_reg_weight=1.0)
    plain = get_hyperadalora_model(tiny_llama(), avg_rank=2, total_steps=20, orth_reg_weight=0.0)
    batch = random_batches(1)[0]
    torch.manual_seed(0)
    model.train(), plain.train()
    with torch.no_grad():
        gap = model(**batch, labels=batch["input_ids"]).loss - plain(**batch, labels=batch["input_ids"]).loss
    assert gap > 0.5  # P, Q start far from orthonormal: ‖PᵀP − I‖_F ≈ √r
    model.eval(), plain.eval()
    with torch.no_grad():
        labels = batch["input_ids"]
        assert torch.equal(model(**batch, labels=labels).loss, plain(**batch, labels=labels).loss)


@pytest.mark.parametrize("settings, message", [
    ({"avg_rank": 4, "total_steps": 20, "init_rank": 2}, "init_rank .* at least avg_rank"),
    ({"avg_rank": 0, "total_steps": 20}, "avg_rank must be a positive integer"),
    ({"avg_rank": 2, "total_steps": 5, "tinit": 3, "tfinal": 2}, "no steps to prune"),
    ({"avg_rank": 2, "total_steps": 20, "hidden_size": 30, "num_heads": 4}, "multiple of num_heads"),
    ({"avg_rank": 2, "total_steps": 20, "beta1": 1.0}, "beta1 must lie in"),
    ({"avg_rank": 2, "total_steps": 20, "lora_alpha": -1}, "lora_alpha must be a positive"),
])
def test_bad_settings_are_refused_clearly(settings, message):
    with pytest.raises(ValueError, match=message):
        HyperAdaLoraConfig(**settings)


def test_a_wrapped_model_is_refused_and_a_failed_wrap_leaves_the_model_alone():
    base = tiny_llama()
    model = get_hyperadalora_model(base, avg_rank=2, total_steps=20)
    with pytest.raises(ValueError, match="already carries HyperAdaLoRA"):
        get_hyperadalora_model(model.model, avg_rank=2, total_steps=20)
    fresh = tiny_llama()
    with pytest.raises(Exception, match="nope|match"):
        get_hyperadalora_model(fresh, avg_rank=2, total_steps=20, target_modules=["nope"])
    assert all(p.requires_grad for p in fresh.parameters())
