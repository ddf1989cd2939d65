"""TsqLoRA's dynamic ranks: first-order sensitivity, exact budget after every change, optimiser state carried,
loss continuous, learning-rate schedule undisturbed, and a plain PEFT adapter at the end."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import random_batches, tiny_llama
from sensitivity_lora.training.dynamic_ranks import DynamicRanks, RankSchedule, move_towards
from sensitivity_lora.training.resize import resize_lora_layer
from sensitivity_lora.training.sensitivity import first_order_sensitivity, initial_ranks

torch.set_num_threads(1)
TARGETS = ["q_proj", "v_proj", "down_proj"]


def labelled(batches):
    return [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)} for b in batches]


def peft_llama(r: int = 4, seed: int = 0, **kwargs):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(tiny_llama(seed), LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, **kwargs))


def test_first_order_sensitivity_is_mean_abs_w_times_grad_and_leaves_the_model_as_it_was():
    model = tiny_llama().train()  # in training mode, so that the mode coming back is checked
    batches = labelled(random_batches(2, batch=3, seq=10))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    scores = first_order_sensitivity(model, batches, TARGETS)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters()) and model.training
    model.eval()  # the reference below runs without dropout, as the measurement did
    names = list(scores)
    reference = {n: 0.0 for n in names}
    for batch in batches:  # the plain definition: weights requiring grad, autograd, |W ⊙ ∇W|
        weights = [model.get_submodule(n).weight for n in names]
        grads = torch.autograd.grad(model(**batch).loss, weights)
        for n, w, g in zip(names, weights, grads):
            reference[n] += float((w * g).abs().mean()) / len(batches)
    for n in names:
        assert scores[n] == pytest.approx(reference[n], rel=1e-4)
    ranks = initial_ranks(model, batches, 4, TARGETS)
    assert sum(ranks.values()) == 4 * len(names) and min(ranks.values()) >= 1 and max(ranks.values()) <= 16
    hessian = initial_ranks(model, batches, 4, TARGETS, scores="hessian")
    assert sum(hessian.values()) == 4 * len(names)
    with pytest.raises(ValueError, match="labelled"):
        first_order_sensitivity(model, random_batches(1), TARGETS)


def test_move_towards_keeps_the_sum_and_moves_at_most_max_moves():
    current, target = {"a": 4, "b": 4, "c": 4}, {"a": 1, "b": 4, "c": 7}
    assert move_towards(current, target, 2) == {"a": 2, "b": 4, "c": 6}
    assert move_towards(current, target, 10) == target


def test_resize_carries_kept_directions_and_their_adam_state_and_keeps_the_function_when_growing():
    model = peft_llama()
    batch = labelled(random_batches(1, batch=2, seq=8))[0]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a0, b0 = a.detach().clone(), b.detach().clone()
    sa, sb = {k: v.clone() for k, v in opt.state[a].items()}, {k: v.clone() for k, v in opt.state[b].items()}
    scale = layer.scaling["default"]
    with torch.no_grad():
        before = model(**batch).logits
    keep = torch.tensor([0, 2, 3])
    resize_lora_layer(layer, "default", keep, 6, opt, torch.Generator().manual_seed(0))
    new_a, new_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert new_a.shape == (6, a0.shape[1]) and new_b.shape == (b0.shape[0], 6) and layer.r["default"] == 6
    assert layer.scaling["default"] == scale and layer.lora_alpha["default"] == scale * 6
    torch.testing.assert_close(new_a[:3], a0[keep]) and torch.testing.assert_close(new_b[:, :3], b0[:, keep])
    assert new_b[:, 3:].abs().max() == 0 and new_a[3:].abs().max() > 0
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt.state[new_a][key][:3], sa[key][keep])
        torch.testing.assert_close(opt.state[new_b][key][:, :3], sb[key][:, keep])
        assert opt.state[new_a][key][3:].abs().max() == 0 and opt.state[new_b][key][:, 3:].abs().max() == 0
    assert float(opt.state[new_a]["step"]) == float(sa["step"])
    assert a not in opt.state and any(p is new_a for p in opt.param_groups[0]["params"])
    # direction 1 went; add its contribution back and the function is the old one exactly
    with torch.no_grad():
        gone = scale * b0[:, 1:2] @ a0[1:2]
        layer.base_layer.weight += gone
        torch.testing.assert_close(model(**batch).logits, before, rtol=1e-5, atol=1e-5)
        layer.base_layer.weight -= gone
    model(**batch).loss.backward()
    opt.step()  # the optimiser runs on the new parameters
    with pytest.raises(ValueError, match="distinct"):
        resize_lora_layer(layer, "default", torch.tensor([0, 0]), 4, opt)


def train_with_dynamic_ranks(steps: int = 12, every: int = 3):
    model = peft_llama(r=4)
    batches = labelled(random_batches(4, batch=3, seq=10, seed=5))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    ranks = DynamicRanks(model, RankSchedule(every=every, window=2, stop=1.0, max_moves=4), total_steps=steps)
    model.train()
    losses, lrs, events = [], [], []
    for step in range(steps):
        ranks.step_begin(step)
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        batch = batches[(step + 1) % len(batches)]
        with torch.no_grad():
            before = float(model(**batch).loss)
        changes = ranks.step_end(step + 1, opt)
        if changes:
            with torch.no_grad():
                after = float(model(**batch).loss)
            events.append((step + 1, changes, before, after))
        assert sum(ranks.ranks().values()) == ranks.budget  # exact after every step, so after every change
    return model, ranks, losses, lrs, events


def test_budget_exact_after_every_change_loss_continuous_and_lr_schedule_undisturbed():
    model, ranks, losses, lrs, events = train_with_dynamic_ranks()
    assert ranks.change_steps == [3, 6, 9] and len(events) >= 2
    assert len(set(ranks.history[-1]["ranks"].values())) > 1  # the ranks did move
    for _, changes, before, after in events:
        assert sum(new - old for old, new in changes.values()) == 0
        assert abs(after - before) < 1e-3 * before  # only the least important directions leave
    steps = len(lrs)
    assert lrs == pytest.approx([5e-3 * (1 - s / steps) for s in range(steps)])
    jumps = [abs(b - a) for a, b in zip(losses, losses[1:])]
    assert max(jumps) < 1.0  # no step blows up after a change (stale or mis-sized optimiser state would)
    config = model.peft_config["default"]
    for name, rank in ranks.ranks().items():
        layer = ranks.layers[name]
        assert layer.lora_A["default"].weight.shape[0] == rank
        assert config.rank_pattern[name.replace(".", r"\.")] == rank


def test_a_trained_adapter_reloads_in_a_fresh_process_with_identical_outputs(tmp_path: Path):
    model, ranks, *_ = train_with_dynamic_ranks()
    model.eval()
    ids = torch.arange(12).reshape(2, 6) % 128
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama(0).save_pretrained(base_dir)
    model.save_pretrained(adapter_dir)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert len(saved["rank_pattern"]) == len(ranks.layers)
    script = textwrap.dedent(f"""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r})
        model = PeftModel.from_pretrained(base, {str(adapter_dir)!r}).eval()
        ids = torch.arange(12).reshape(2, 6) % 128
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, {str(tmp_path / 'out.pt')!r})
    """)  # no import of sensitivity_lora: PEFT alone must load it
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [{"every": 0}, {"stop": 1.5}, {"window": 0}, {"rho": 0.5}, {"max_moves": 0}])
def test_rank_schedule_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        RankSchedule(**bad)
    assert RankSchedule(every=10).steps(100) == [10, 20, 30, 40, 50, 60, 70, 80]


def test_direction_scores_rank_directions_by_what_removing_them_does_to_the_loss():
    from sensitivity_lora.training.sensitivity import SensitivityProbe

    model = peft_llama(r=6)
    batch = labelled(random_batches(1, batch=4, seq=10, seed=3))[0]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(6):  # B away from 0, so the directions differ
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    probe = SensitivityProbe({"v": layer})
    probe.attach()
    loss = model(**batch).loss
    loss.backward()
    probe.detach()
    scores = probe.direction_scores("v")
    b = layer.lora_B["default"].weight
    actual = []
    with torch.no_grad():
        for i in range(6):
            saved = b[:, i].clone()
            b[:, i] = 0
            actual.append(abs(float(model(**batch).loss) - float(loss)))
            b[:, i] = saved
    # the first-order estimate tracks the real change: its least and most important directions agree
    assert actual[int(scores.argmin())] < actual[int(scores.argmax())]
    assert actual[int(scores.argmin())] <= sorted(actual)[2]


def _adam_after_steps(model, batch, steps: int = 2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_a_failed_rank_change_leaves_the_model_and_the_optimiser_as_they_were():
    model = peft_llama(r=4)
    batch = labelled(random_batches(1, batch=3, seq=10, seed=2))[0]
    opt = _adam_after_steps(model, batch)
    ranks = DynamicRanks(model, RankSchedule(every=1, window=1, stop=10, max_moves=6))
    names = list(ranks.layers)
    for name in names[1:]:  # an optimiser state this code cannot carry, on every layer but the first
        b = ranks.layers[name].lora_B["default"].weight
        opt.state[b]["odd"] = torch.zeros(3)
    model.train()
    ranks.step_begin(0)
    model(**batch).loss.backward()
    params = {n: p for n, p in model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    before = ranks.ranks()
    with pytest.raises(ValueError, match="cannot be carried"):
        ranks.reallocate(opt, 1)
    assert ranks.ranks() == before and {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())  # no parameter was swapped
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in params.values() if p.requires_grad]
    for p, s in opt.state.items():
        assert s.keys() == state[id(p)].keys() and all(torch.equal(s[k], state[id(p)][k]) for k in s)
    # the same on one layer: the B failure comes after A's new tensors were built, and A is untouched
    layer = ranks.layers[names[1]]
    a = layer.lora_A["default"].weight
    with pytest.raises(ValueError, match="cannot be carried"):
        resize_lora_layer(layer, "default", torch.arange(2), 5, opt)
    assert layer.lora_A["default"].weight is a and layer.r["default"] == before[names[1]] and a in opt.state


def test_a_step_stop_schedules_changes_without_the_total_step_count():
    ranks = DynamicRanks(peft_llama(r=4), RankSchedule(every=3, stop=9))
    assert ranks.change_steps == [3, 6, 9]
    assert DynamicRanks(peft_llama(r=4), RankSchedule(every=3, stop=0.5)).change_steps == []  # waits for the total


def test_the_sensitivity_probe_skips_steps_whose_gradient_overflowed():
    from sensitivity_lora.training.sensitivity import SensitivityProbe

    model = peft_llama(r=4)
    batch = labelled(random_batches(1, batch=3, seq=10, seed=4))[0]
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    probe = SensitivityProbe({"q": layer})
    probe.attach()
    (model(**batch).loss * float("inf")).backward()  # what an fp16 overflow step looks like
    assert probe.calls["q"] == 0 and probe.scores()["q"] == 0.0
    model.zero_grad()
    model(**batch).loss.backward()
    probe.detach()
    assert probe.calls["q"] == 1 and 0 < probe.scores()["q"] < float("inf")


def test_a_budget_that_cannot_fit_under_the_caps_is_refused_at_the_start():
    DynamicRanks(peft_llama(r=4), RankSchedule(rho=1.0), total_steps=10)  # Σr = M·r̄ fits exactly under ρ = 1
    model = peft_llama(r=4)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.r["default"] = 5  # one module above r̄ = Σr / M while ρ = 1 caps every module at ⌊r̄⌋
    with pytest.raises(ValueError, match="does not fit"):
        DynamicRanks(model, RankSchedule(rho=1.0), total_steps=10)
