"""HyperAdaLoRA's export: a plain PEFT LoRA adapter that computes what the trained model computes,
and loads (and merges) in a fresh process without this package."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import random_batches, tiny_gpt2, tiny_llama
from sensitivity_lora.hyperadalora import get_hyperadalora_model, save_lora_adapter, to_peft_model
from test_hyperadalora import train_steps


def trained(make=tiny_llama, **settings):
    model = get_hyperadalora_model(make(), avg_rank=2, total_steps=12, tinit=2, tfinal=3, delta_t=2, **settings)
    train_steps(model, 12)
    assert model.allocator.final
    return model


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_the_exported_adapter_computes_what_the_trained_model_computes(make):
    model = trained(make)
    batches = random_batches(n_batches=2, seed=7)
    with torch.no_grad():
        expected = [model(**b).logits for b in batches]
        peft_model = to_peft_model(model)
        got = [peft_model(**b).logits for b in batches]
        still = [model(**b).logits for b in batches]  # inplace=False: the HyperAdaLoRA model still works
    diff = max(float((e - g).abs().max()) for e, g in zip(expected, got))
    print(f"{make.__name__}: max |exported − trained| = {diff:.3g} (logits up to "
          f"{max(float(e.abs().max()) for e in expected):.3g})")
    assert diff < 1e-5
    assert all(torch.equal(e, s) for e, s in zip(expected, still))
    with torch.no_grad():
        base_logits = make()(**batches[0]).logits
    assert float((base_logits - expected[0]).abs().max()) > 1e-3  # the adapter does something
    config = peft_model.peft_config["default"]
    ranks = model.ranks()
    assert {k.replace("\\", ""): v for k, v in config.rank_pattern.items()} == {n: r for n, r in ranks.items() if r}
    assert sum(config.rank_pattern.values()) == 2 * len(model.targets)
    from sensitivity_lora.peft import verify_ranks

    verify_ranks(peft_model, config)  # every layer's rank and alpha as the config gives them


def test_modules_that_keep_no_triplet_get_no_adapter():
    model = trained()
    n, masks = len(model.targets), model.masks()
    kept = [0, 3, 3] + [2] * (n - 3)  # the exact budget 2n, module 0 pruned away entirely
    with torch.no_grad():
        for name, k in zip(model.targets, kept):
            masks[name].zero_()[:k] = 1.0
    assert sum(model.ranks().values()) == model.allocator.target_budget
    batch = random_batches(1, seed=3)[0]
    with torch.no_grad():
        expected = model(**batch).logits
        peft_model = to_peft_model(model)
        assert float((peft_model(**batch).logits - expected).abs().max()) < 1e-5
    exported = {k.replace("\\", "") for k in peft_model.peft_config["default"].rank_pattern}
    assert exported == set(model.targets[1:])


def test_export_before_the_final_budget_is_refused():
    model = get_hyperadalora_model(tiny_llama(), avg_rank=2, total_steps=12, tinit=2, tfinal=3)
    with pytest.raises(ValueError, match="final rank budget is not in force"):
        to_peft_model(model)
    model.finalize_ranks()
    assert sum(model.ranks().values()) == 2 * len(model.targets)
    to_peft_model(model)


def test_the_export_reloads_and_merges_in_a_fresh_process_without_this_package(tmp_path):
    model = trained()
    batch = random_batches(1, seed=11)[0]
    with torch.no_grad():
        expected = model(**batch).logits
    tiny_llama().save_pretrained(tmp_path / "base")  # the same seed: the base model the adapter was trained on
    save_lora_adapter(model, tmp_path / "adapter")
    torch.save({"batch": batch, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["sensitivity_lora"] = None  # importing this package now fails: the adapter must not need it
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        io = torch.load({str(tmp_path / "io.pt")!r})
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r}).eval()
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            loaded = model(**io["batch"]).logits
            merged = model.merge_and_unload()(**io["batch"]).logits
        print(json.dumps({{"loaded": float((loaded - io["expected"]).abs().max()),
                          "merged": float((merged - io["expected"]).abs().max())}}))
    """)
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    diffs = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"fresh process: max |loaded − trained| = {diffs['loaded']:.3g}, merged {diffs['merged']:.3g}")
    assert diffs["loaded"] < 1e-5 and diffs["merged"] < 1e-4


def test_text_generation_reaches_the_base_model_and_matches_the_export():
    model = trained()
    prompt = random_batches(1, batch=2, seq=5, pad=False)[0]
    with torch.no_grad():
        ours = model.generate(**prompt, max_new_tokens=4, do_sample=False)  # the base model's, with the updates
        theirs = to_peft_model(model).generate(**prompt, max_new_tokens=4, do_sample=False)
    assert ours.shape == (2, 9) and torch.equal(ours, theirs)
