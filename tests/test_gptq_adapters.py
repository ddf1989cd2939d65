"""GPTQ adapters against each tool's own accumulation, restated here where the tool does not install on CPU.

llm-compressor's own functions are used in tests/test_gptq_llmcompressor.py (its own venv, .ci/llmcompressor_check.sh).
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import random_batches, tiny_gpt2, tiny_llama
from sensitivity_lora.calibration import calibrate
from sensitivity_lora.calibration.targets import resolve_targets
from sensitivity_lora.errors import TargetError
from sensitivity_lora.hessians import export_hessians, load_hessians
from sensitivity_lora.hessians.gptq import gptq_hessians, sample_counts

pytestmark = pytest.mark.filterwarnings("ignore:sensitivity_lora._C is not built")


class GPTQModelH:
    """GPTQModel's accumulation, restated from ModelCloud/GPTQModel gptqmodel/quantization/gptq.py (commit
    00e0b834bfce98832719969bbc19332856a7c43d), ``GPTQ.process_batch``: fp32, every token of the batch counts."""

    def __init__(self, d: int) -> None:
        self.H, self.nsamples = torch.zeros(d, d, dtype=torch.float32), 0

    def add_batch(self, inp: torch.Tensor) -> None:
        x = inp.to(torch.float32).reshape(-1, inp.shape[-1])
        b = x.shape[0]
        beta, alpha = self.nsamples / (self.nsamples + b), 2.0 / (self.nsamples + b)
        self.H.addmm_(x.T, x, beta=beta, alpha=alpha)
        self.nsamples += b


class ReferenceGPTQH:
    """The reference GPTQ's accumulation, restated from IST-DASLab/gptq gptq.py, ``GPTQ.add_batch``: fp32,
    ``nsamples`` counts the batch's rows (sequences)."""

    def __init__(self, d: int) -> None:
        self.H, self.nsamples = torch.zeros(d, d, dtype=torch.float32), 0

    def add_batch(self, inp: torch.Tensor) -> None:
        tmp = inp.shape[0] if inp.dim() == 3 else 1
        x = inp.reshape(-1, inp.shape[-1]).t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        x = math.sqrt(2 / self.nsamples) * x.float()
        self.H += x.matmul(x.t())


def own_accumulation(model, batches, kind) -> dict[str, object]:
    mods = dict(model.named_modules())
    names = resolve_targets(model)
    acc = {n: kind(mods[n].weight.shape[-1] if isinstance(mods[n], torch.nn.Linear) else mods[n].weight.shape[0])
           for n in names}
    handles = [mods[n].register_forward_pre_hook(lambda _m, args, n=n: acc[n].add_batch(args[0])) for n in names]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    return acc


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
@pytest.mark.parametrize("tool,kind", [("gptqmodel", GPTQModelH), ("gptq", ReferenceGPTQH)])
def test_adapter_equals_the_tools_own_accumulation(tmp_path, make_model, tool, kind):
    model, batches = make_model(), random_batches(3, batch=2, pad=False)  # the tools count padding: none here
    own = own_accumulation(model, batches, kind)
    stats = calibrate(model, batches, hessian="full", progress=False)
    export_hessians(model, batches, tmp_path / "h", storage_dtype="float32", layout="upper", progress=False)
    for source in (stats, tmp_path / "h"):
        hessians, counts = gptq_hessians(source, tool), sample_counts(source, tool)
        assert set(hessians) == set(own) == set(counts)
        for name, acc in own.items():
            assert hessians[name].dtype == torch.float32 and counts[name] == acc.nsamples
            torch.testing.assert_close(hessians[name], acc.H, rtol=1e-5, atol=1e-5 * float(acc.H.abs().max()))


def test_one_matrix_per_module_never_shared():
    model, batches = tiny_llama(), random_batches(1, pad=False)
    hessians = gptq_hessians(calibrate(model, batches, hessian="full", progress=False), "llm-compressor")
    q, k, v = (hessians[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert torch.equal(q, k) and torch.equal(k, v)
    assert len({q.data_ptr(), k.data_ptr(), v.data_ptr()}) == 3  # the solvers damp them in place
    counts = sample_counts(calibrate(model, batches, hessian="full", progress=False), "gptqmodel")
    assert counts["model.layers.0.mlp.up_proj"] == 4 * 12


def test_names_follow_a_wrapped_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, batches = tiny_llama(), random_batches(1, pad=False)
    stats = calibrate(model, batches, hessian="full", progress=False)
    plain = gptq_hessians(stats, "gptq")
    prefixed = gptq_hessians(stats, "gptq", prefix="base_model.model.")
    assert set(prefixed) == {"base_model.model." + n for n in plain}
    wrapped = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    mapped = gptq_hessians(stats, "gptq", model=wrapped)
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer" in mapped  # the linear inside LoRA
    assert "base_model.model.model.layers.0.self_attn.k_proj" in mapped
    linears = {n for n, m in wrapped.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(mapped) <= linears and len(mapped) == len(plain)
    # the other way round: Hessians named after the wrapped model, onto the bare one
    export_hessians(model, batches, tmp_path, progress=False)
    files = load_hessians(tmp_path, by="group")
    for h in files.values():
        h.members = ["base_model.model." + m for m in h.members]
    assert set(gptq_hessians(files, "gptq", model=tiny_llama())) == set(plain)
    only = gptq_hessians(stats, "gptq", modules=["model.layers.1.mlp.down_proj"])
    assert list(only) == ["model.layers.1.mlp.down_proj"]


def test_adapter_errors():
    model, batches = tiny_llama(), random_batches(1, pad=False)
    stats = calibrate(model, batches, hessian="full", progress=False)
    with pytest.raises(ValueError, match="unknown GPTQ tool"):
        gptq_hessians(stats, "autogptq")
    with pytest.raises(TargetError, match="matches no linear layer"):
        gptq_hessians(stats, "gptq", model=tiny_gpt2())
    with pytest.raises(TargetError, match="no Hessian for"):
        gptq_hessians(stats, "gptq", modules=["lm_head"])
    with pytest.raises(ValueError, match="hessian='full'"):
        gptq_hessians(calibrate(model, batches, progress=False), "gptq")
    with pytest.raises(TypeError, match="source must be"):
        gptq_hessians([1, 2], "gptq")
