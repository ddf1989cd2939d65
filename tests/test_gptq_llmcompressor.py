"""The llm-compressor adapter and glue against llm-compressor 0.14's own accumulation and sequential pipeline.

Needs llm-compressor, which pins its own transformers: .ci/llmcompressor_check.sh installs it in a venv of its
own and runs this file there (PYTHONPATH = the checkout). Skipped elsewhere.
"""
from __future__ import annotations

import pytest
import torch

llmcompressor = pytest.importorskip("llmcompressor", reason="llm-compressor is not installed here; "
                                    ".ci/llmcompressor_check.sh runs these tests in a venv that has it")

from conftest import random_batches, tiny_llama  # noqa: E402
from sensitivity_lora.calibration import calibrate  # noqa: E402
from sensitivity_lora.hessians import export_hessians  # noqa: E402
from sensitivity_lora.hessians.gptq import gptq_hessians, sample_counts  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
SCHEME = {"group_0": {"targets": ["Linear"],
                      "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}}}


def modifier():
    from llmcompressor.modifiers.gptq import GPTQModifier

    return GPTQModifier(config_groups=SCHEME, ignore=["lm_head"])


@pytest.fixture
def spy(monkeypatch):
    """The normalised Hessian of every module at the moment llm-compressor's GPTQ solves it."""
    import llmcompressor.modifiers.gptq.base as base

    seen: dict[str, torch.Tensor] = {}
    original = base.GPTQModifier.compress_modules

    def compress_modules(self):
        for module, h in self._hessians.items():
            seen[self._module_names[module]] = (h / self._num_samples[module]).clone()
        return original(self)

    monkeypatch.setattr(base.GPTQModifier, "compress_modules", compress_modules)
    return seen


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_adapter_equals_accumulate_hessian(tmp_path):
    from llmcompressor.modifiers.gptq.helpers import accumulate_hessian, make_empty_hessian

    model, batches = tiny_llama(), random_batches(3, batch=2, pad=False)  # it counts padding: none here
    mods = dict(model.named_modules())
    names = [n for n in mods if n.startswith("model.layers.") and isinstance(mods[n], torch.nn.Linear)]
    acc = {n: [make_empty_hessian(mods[n]), torch.zeros(())] for n in names}

    def hook(n):
        def fn(module, args):
            acc[n][0], acc[n][1] = accumulate_hessian(args[0], module, acc[n][0], acc[n][1])
        return fn

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    export_hessians(model, batches, tmp_path, storage_dtype="float32", layout="upper", progress=False)
    for source in (calibrate(model, batches, hessian="full", progress=False), tmp_path):
        hessians, counts = gptq_hessians(source, "llm-compressor"), sample_counts(source, "llm-compressor")
        for n in names:
            own = acc[n][0] / acc[n][1]  # prepare_batch's normalisation
            assert counts[n] == int(acc[n][1]) and hessians[n].dtype == own.dtype == torch.float32
            torch.testing.assert_close(hessians[n], own, rtol=1e-5, atol=1e-5 * float(own.abs().max()))


def _own_oneshot(tmp_path, batches):
    from datasets import Dataset
    from llmcompressor import oneshot
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama()
    model.save_pretrained(tmp_path / "tiny")  # oneshot reads the config from the model's path
    model.config._name_or_path = str(tmp_path / "tiny")
    vocab = {f"t{i}": i for i in range(128)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0")
    ds = Dataset.from_dict({k: [b[k][0].tolist() for b in batches] for k in ("input_ids", "attention_mask")})
    oneshot(model=model, dataset=ds, recipe=modifier(), processor=tok, num_calibration_samples=len(ds),
            shuffle_calibration_samples=False, max_seq_length=batches[0]["input_ids"].shape[1])
    return model


def test_sequential_glue_equals_llmcompressors_own_sequential_gptq(tmp_path, spy):
    from sensitivity_lora.calibration.streaming import iter_block_statistics
    from sensitivity_lora.hessians.llmcompressor import gptq_quantize

    batches = random_batches(6, batch=1, seq=16, pad=False)  # llm-compressor's default batch size 1
    own_model = _own_oneshot(tmp_path, batches)
    own = dict(spy)
    spy.clear()
    model = tiny_llama()
    gptq_quantize(model, batches, modifier(), progress=False)
    ours = dict(spy)
    spy.clear()
    gptq_quantize(tiny_llama(), batches, modifier(), sequential=False, progress=False)
    one_shot = dict(spy)
    assert set(own) == set(ours) == set(one_shot) and len(own) == 14
    # teacher-forced: the engine's consumer writes llm-compressor's own quantised weights into each block, so
    # every block sees llm-compressor's inputs: the Hessians must agree to fp32 rounding
    forced, own_weights = {}, dict(own_model.named_parameters())
    replay = tiny_llama()
    for block in iter_block_statistics(replay, batches, list(own), "full", sequential=True, progress=False):
        members = [m for g in block.stats.groups.values() for m in g.members]
        forced.update({m: g.hessian("2/sequences").float() for g in block.stats.groups.values() for m in g.members})
        with torch.no_grad():
            for m in members:
                replay.get_submodule(m).weight.copy_(own_weights[m + ".weight"])
    for n in own:
        assert rel(forced[n], own[n]) < 1e-6, n
    # free-running (the glue's own GPTQ): block 0 has the same inputs; later blocks may drift by GPTQ's
    # amplification of fp32 rounding (docs/gptq.md), which this tiny model does not show
    for n in own:
        assert rel(ours[n], own[n]) < (1e-6 if ".layers.0." in n else 1e-3), n
    # later blocks: the one-shot Hessians (unquantised inputs) are not llm-compressor's
    assert rel(one_shot["model.layers.1.mlp.down_proj"], own["model.layers.1.mlp.down_proj"]) > 1e-3
    quantised = [n + ".weight" for n in own]
    differ = sum(int((dict(model.named_parameters())[n] != own_weights[n]).sum()) for n in quantised)
    assert differ / sum(own_weights[n].numel() for n in quantised) < 0.01
    assert hasattr(model.model.layers[0].self_attn.q_proj, "weight_scale")  # its own parameters, filled


def test_glue_from_an_export_folder_equals_the_one_shot_engine(tmp_path):
    from sensitivity_lora.hessians.llmcompressor import gptq_quantize

    batches = random_batches(4, batch=1, seq=16, pad=False)
    export_hessians(tiny_llama(), batches, tmp_path, storage_dtype="float32", progress=False)
    from_files, from_engine = tiny_llama(), tiny_llama()
    gptq_quantize(from_files, None, modifier(), sequential=False, source=tmp_path)
    gptq_quantize(from_engine, batches, modifier(), sequential=False, progress=False)
    for (n, p), (_, q) in zip(from_files.named_parameters(), from_engine.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert not torch.equal(from_files.model.layers[0].mlp.up_proj.weight, tiny_llama().model.layers[0].mlp.up_proj.weight)


def test_glue_refuses_other_versions_and_bad_arguments(monkeypatch):
    from sensitivity_lora.errors import TargetError
    from sensitivity_lora.hessians.llmcompressor import gptq_quantize

    batches = random_batches(1, batch=1, pad=False)
    monkeypatch.setattr(llmcompressor, "__version__", "0.15.0")
    with pytest.raises(ImportError, match="written for 0.14"):
        gptq_quantize(tiny_llama(), batches, modifier())
    monkeypatch.undo()
    with pytest.raises(ValueError, match="not both"):
        gptq_quantize(tiny_llama(), batches, modifier(), source="somewhere")
    from llmcompressor.modifiers.gptq import GPTQModifier

    with pytest.raises(ValueError, match="weight-only"):
        gptq_quantize(tiny_llama(), batches, GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]))
    with pytest.raises(TargetError, match="ignore"):  # lm_head is outside the blocks
        gptq_quantize(tiny_llama(), batches, GPTQModifier(config_groups=SCHEME), progress=False)
