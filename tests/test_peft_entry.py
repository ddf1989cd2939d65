"""The PEFT-native entry (SensitivityConfig + initialize_lora_sensitivity), the data forms it reads,
and verifying a saved adapter folder on its own."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import random_batches, tiny_llama
from model_snapshot import assert_unchanged, snapshot
from sensitivity_lora import compute_allocation, verify_ranks
from sensitivity_lora.batches import as_batches
from sensitivity_lora.errors import DataError, RankMismatchError
from sensitivity_lora.peft import adapter_layers
from sensitivity_lora.peft_entry import SensitivityConfig, initialize_lora_sensitivity

QUIET = SensitivityConfig(progress=False)


class WordTokenizer:
    """A tokenizer callable like transformers' (ids = word lengths + 1 mod the tiny vocabulary)."""

    pad_token_id = 0

    def __call__(self, texts, truncation=True, max_length=None):
        ids = [[(len(w) % 120) + 1 for w in t.split()][:max_length] for t in texts]
        return {"input_ids": ids}


def _texts(n: int = 12) -> list[str]:
    return [" ".join("word" * (1 + (i * j) % 5) for j in range(6 + i % 4)) for i in range(n)]


def _ranks(peft_model) -> dict[str, int]:
    return {p.removeprefix("base_model.model."): int(m.r["default"]) for p, m in adapter_layers(peft_model, "default")}


# --- the entry -------------------------------------------------------------------------------------------

def test_peft_model_input_gets_the_allocation_ranks_and_initial_weights():
    batches = random_batches()
    reference = compute_allocation(tiny_llama(), batches, 4, QUIET.allocation_settings(), progress=False)
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    out = initialize_lora_sensitivity(peft_model, batches, config=QUIET)
    assert isinstance(out, PeftModel)
    assert _ranks(out) == {n: r for n, r in reference.ranks().items() if r > 0}
    for path, layer in adapter_layers(out, "default"):
        name = path.removeprefix("base_model.model.")
        torch.testing.assert_close(layer.lora_A["default"].weight, reference.initial_weights[name].float())
        assert not layer.lora_B["default"].weight.any()
    scales = {float(m.scaling["default"]) for _, m in adapter_layers(out, "default")}
    assert max(scales) == pytest.approx(min(scales)) == pytest.approx(8 / 4)  # uniform LoRA's alpha / r̄


def test_lora_config_targets_are_the_modules_peft_would_adapt():
    model = tiny_llama()
    out = initialize_lora_sensitivity(model, random_batches(), LoraConfig(r=3, lora_alpha=6,
                                      target_modules=["q_proj", "v_proj"], lora_dropout=0.1), QUIET)
    names = set(_ranks(out))
    assert names == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert sum(_ranks(out).values()) == 3 * 4  # the budget r̄ × modules
    config = out.peft_config["default"]
    assert config.lora_dropout == 0.1  # the user's other LoRA settings are kept


def test_default_lora_config_adapts_every_block_linear():
    out = initialize_lora_sensitivity(tiny_llama(), random_batches(), config=QUIET)
    assert len(_ranks(out)) == 14 and sum(_ranks(out).values()) == 8 * 14


def test_init_none_keeps_peft_initialisation_and_eva_replaces_ranks():
    batches = random_batches()
    plain = initialize_lora_sensitivity(tiny_llama(), batches, config=SensitivityConfig(init="none", progress=False))
    assert all(not m.lora_B["default"].weight.any() for _, m in adapter_layers(plain, "default"))  # PEFT's B = 0
    eva = initialize_lora_sensitivity(tiny_llama(), batches, config=SensitivityConfig(init="eva", progress=False))
    reference = compute_allocation(tiny_llama(), batches, 8, init="eva", progress=False)
    assert _ranks(eva) == {n: r for n, r in reference.ranks().items() if r > 0}


@pytest.mark.parametrize("make_call, match", [
    (lambda m: initialize_lora_sensitivity(m, random_batches(), LoraConfig(r=2, rank_pattern={"q_proj": 4}), QUIET),
     "rank_pattern"),
    (lambda m: initialize_lora_sensitivity(m, random_batches(), LoraConfig(r=2, init_lora_weights="pissa"),
                                           SensitivityConfig(init="covariance", progress=False)), "conflicts"),
    (lambda m: initialize_lora_sensitivity(m, random_batches(), LoraConfig(r=2, init_lora_weights="eva"), QUIET),
     "own initialisation"),
    (lambda m: initialize_lora_sensitivity(m, "one string", config=QUIET), "not one string"),
    (lambda m: initialize_lora_sensitivity(m, ["a text"], config=QUIET), "tokenizer="),
    (lambda m: initialize_lora_sensitivity(m, random_batches(), config=object()), "SensitivityConfig"),
])
def test_bad_input_is_refused_and_the_model_is_unchanged(make_call, match):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises((ValueError, DataError), match=match):
        make_call(model)
    assert_unchanged(before, model)


def test_a_peft_model_with_another_lora_config_is_refused_unchanged():
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    before = snapshot(peft_model)
    with pytest.raises(ValueError, match="not both"):
        initialize_lora_sensitivity(peft_model, random_batches(), LoraConfig(r=2), QUIET)
    assert_unchanged(before, peft_model)


def test_a_failed_run_puts_the_peft_models_adapters_back():
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    before = snapshot(peft_model)
    bad = [{"input_ids": torch.full((2, 5), 10_000)}]  # ids beyond the vocabulary: calibration fails
    with pytest.raises(Exception, match="batch 0"):
        initialize_lora_sensitivity(peft_model, bad, config=QUIET)
    assert_unchanged(before, peft_model)


def test_two_adapters_are_refused():
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="holds adapters"):
        initialize_lora_sensitivity(peft_model, random_batches(), config=QUIET)


def test_auto_init_is_the_gain_matched_covariance_start_for_a_causal_lm_and_peft_own_otherwise():
    from conftest import tiny_bert

    causal = initialize_lora_sensitivity(tiny_llama(), random_batches(), LoraConfig(r=2, target_modules=["q_proj"]),
                                         QUIET)
    assert causal.peft_config["default"].init_lora_weights is True
    assert all(m.lora_A["default"].weight.abs().sum() > 0 and not m.lora_B["default"].weight.any()
               for _, m in adapter_layers(causal, "default"))
    reference = compute_allocation(tiny_llama(), random_batches(), 2, target_modules=["q_proj"], init="covariance",
                                   init_scale="default-gain", progress=False)
    for path, layer in adapter_layers(causal, "default"):
        torch.testing.assert_close(layer.lora_A["default"].weight,
                                   reference.initial_weights[path.removeprefix("base_model.model.")].float())
    encoder = tiny_bert()
    batches = [{"input_ids": torch.randint(1, 100, (4, 10)), "attention_mask": torch.ones(4, 10, dtype=torch.long)}]
    plain = initialize_lora_sensitivity(encoder, batches, LoraConfig(r=2, target_modules=["query"]), QUIET)
    plain_reference = compute_allocation(tiny_bert(), batches, 2, target_modules=["query"], progress=False)
    assert _ranks(plain) == {n: r for n, r in plain_reference.ranks().items() if r > 0}
    assert QUIET.allocation_settings(causal_lm=False).init == "none"
    assert QUIET.allocation_settings(causal_lm=True).init == "covariance"
    assert QUIET.allocation_settings(causal_lm=True).init_scale == "default-gain"  # auto sets both
    assert SensitivityConfig(init="covariance").allocation_settings().init_scale == "unit"  # an explicit init: its own
    pissa = SensitivityConfig(progress=False).allocation_settings(causal_lm=False)
    assert pissa.hessian == "diag"  # nothing forced to full mode where the init is PEFT's own


def test_sensitivity_config_validates_its_own_fields():
    assert SensitivityConfig().init == "auto" and SensitivityConfig(init="eva").hessian == "full"
    with pytest.raises(DataError, match="batch_size"):
        SensitivityConfig(batch_size=0)
    with pytest.raises(ValueError, match="streaming"):
        SensitivityConfig(streaming="yes")
    with pytest.raises(ValueError, match="method"):
        SensitivityConfig(method="nope")
    assert "seq_len" not in SensitivityConfig().allocation_settings().to_dict()


# --- the data forms ----------------------------------------------------------------------------------------

def _same_batches(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_texts_rows_and_datasets_give_the_same_batches():
    datasets = pytest.importorskip("datasets")
    tok, texts = WordTokenizer(), _texts()
    from_texts = as_batches(texts, tok, seq_len=7, batch_size=4)
    ids = tok(texts, max_length=7)["input_ids"]
    rows = [{"input_ids": i, "labels": i} for i in ids]
    _same_batches(as_batches(rows, tok, seq_len=7, batch_size=4), from_texts)
    _same_batches(as_batches(datasets.Dataset.from_list(rows), tok, seq_len=7, batch_size=4), from_texts)
    _same_batches(as_batches(datasets.Dataset.from_dict({"body": texts}), tok, seq_len=7, batch_size=4,
                             text_field="body"), from_texts)
    padded = [{"input_ids": i + [0, 0], "attention_mask": [1] * len(i) + [0, 0]} for i in ids]
    _same_batches(as_batches(padded, tok, seq_len=7, batch_size=4), from_texts)  # the mask drops the padding
    assert len(as_batches(rows, tok, batch_size=4, max_samples=5)) == 2


def test_ready_batches_dataloaders_and_batch_encodings_are_used_as_they_are():
    batches = random_batches()
    _same_batches(as_batches(batches), batches)
    loader = torch.utils.data.DataLoader([{"input_ids": torch.arange(1, 7), "text": "x"}] * 4, batch_size=2)
    made = as_batches(loader)
    assert len(made) == 2 and set(made[0]) == {"input_ids"} and made[0]["input_ids"].shape == (2, 6)
    lists = torch.utils.data.DataLoader([{"input_ids": [1, 2, 3]}] * 4, batch_size=2)  # default_collate transposes
    assert as_batches(lists)[0]["input_ids"].tolist() == [[1, 2, 3], [1, 2, 3]]
    one = as_batches({"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3)})
    assert len(one) == 1 and one[0]["input_ids"].shape == (2, 3)


def test_unreadable_data_gets_a_clear_error():
    datasets = pytest.importorskip("datasets")
    with pytest.raises(DataError, match="columns"):
        as_batches(datasets.Dataset.from_dict({"x": [1, 2]}))
    with pytest.raises(DataError, match="item 1"):
        as_batches([{"input_ids": [1, 2]}, 3])
    with pytest.raises(DataError, match="empty"):
        as_batches([])
    with pytest.raises(DataError, match="2-D"):
        as_batches([{"input_ids": torch.ones(2, 2, 2, dtype=torch.long)}])
    with pytest.raises(DataError, match="attention_mask"):
        as_batches([{"input_ids": [1, 2], "attention_mask": [1]}])


# --- verifying a saved adapter on its own ------------------------------------------------------------------

def test_a_saved_adapter_folder_verifies_on_its_own(tmp_path):
    out = initialize_lora_sensitivity(tiny_llama(), random_batches(), config=QUIET)
    out.save_pretrained(tmp_path)
    verify_ranks(out, tmp_path)
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from conftest import tiny_llama
        from peft import PeftModel
        from sensitivity_lora import verify_ranks
        verify_ranks(PeftModel.from_pretrained(tiny_llama(), {str(tmp_path)!r}), {str(tmp_path)!r})
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_verification_from_a_folder_catches_ignored_patterns(tmp_path):
    out = initialize_lora_sensitivity(tiny_llama(), random_batches(), config=QUIET)
    out.save_pretrained(tmp_path)
    config = out.peft_config["default"]
    # what PEFT 0.13/0.14 built from this config: every module at r, the full-path patterns ignored
    ignored = get_peft_model(tiny_llama(), LoraConfig(r=config.r, lora_alpha=config.lora_alpha,
                                                     target_modules=sorted(config.target_modules)))
    with pytest.raises(RankMismatchError, match="the config gives"):
        verify_ranks(ignored, tmp_path)
    edited = json.loads((tmp_path / "adapter_config.json").read_text())
    edited["target_modules"] = list(edited["target_modules"]) + ["model.layers.9.mlp.up_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(edited))
    with pytest.raises(RankMismatchError, match="no LoRA layer"):
        verify_ranks(out, tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        verify_ranks(out, tmp_path / "missing")
