"""``sensitivity-lora eva``: the state dict PEFT's initialize_lora_eva_weights takes, equal to the API's."""
from __future__ import annotations

import pytest
import torch

from sensitivity_lora.cli import main

from test_cli import text_file  # noqa: F401  (the fixture: the same calibration texts as the other CLI tests)

ARGS = ("--avg-rank", "4", "--max-samples", "12", "--seq-len", "32", "--batch-size", "4", "-q")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_eva_writes_what_peft_loads_and_equals_the_api(tiny_llama_dir, text_file, tmp_path, suffix):
    from peft import EvaConfig, LoraConfig, get_peft_model
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    from sensitivity_lora import compute_allocation

    out = tmp_path / "sub" / f"eva{suffix}"
    assert main(["eva", "--model", str(tiny_llama_dir), "--data", str(text_file), "--out", str(out), *ARGS]) == 0
    if suffix == ".pt":
        state = torch.load(out)
    else:
        from safetensors.torch import load_file

        state = load_file(out)
    from sensitivity_lora.data import calibration_batches, load_texts
    from sensitivity_lora.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir))
    texts = load_texts(str(text_file), max_samples=12, shuffle_seed=0)
    reference = compute_allocation(model, calibration_batches(texts, tokenizer, seq_len=32, batch_size=4), 4,
                                   init="eva", progress=False).eva_state_dict()
    assert state.keys() == reference.keys()
    for name, a in reference.items():
        torch.testing.assert_close(state[name], a)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=sorted({k.rsplit(".", 1)[-1] for k in state}),
                        init_lora_weights="eva", eva_config=EvaConfig(rho=2.0))
    peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
    initialize_lora_eva_weights(peft_model, eva_state_dict=dict(state))
    assert sum(m.r["default"] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
               and "default" in getattr(m, "r", {})) == sum(v.shape[0] for v in state.values())


def test_eva_refuses_an_unknown_suffix_before_loading(tmp_path, capsys):
    assert main(["eva", "--out", str(tmp_path / "eva.bin"), "-q"]) == 2
    assert ".pt or .safetensors" in capsys.readouterr().err
