"""The CorDA covariance file: its format, and PEFT's CorDA built from it without running the model."""
from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("peft")

import sensitivity_lora  # noqa: E402
from sensitivity_lora.init import GroupSums, corda_covariances, write_corda_covariance_file  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def random_sums(seed: int = 0) -> dict[str, GroupSums]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, d, members in [("attn", 16, ("q", "k", "v")), ("mlp", 24, ("down",))]:
        x = torch.randn(100, d, dtype=torch.float64, generator=g)
        out[name] = GroupSums(x.T @ x, x.sum(0), 100, members)
    return out


def test_file_is_a_dict_of_per_token_second_moments(tmp_path):
    sums = random_sums()
    path = write_corda_covariance_file(tmp_path / "sub" / "cov.pt", sums, scale=2.0)
    loaded = torch.load(path, weights_only=True)  # plain tensors only: loads under weights_only too
    assert list(loaded) == ["q", "k", "v", "down"]
    for m, group in [("q", "attn"), ("down", "mlp")]:
        assert loaded[m].dtype == torch.float32 and loaded[m].shape == sums[group].xtx.shape
        assert torch.allclose(loaded[m].double(), 2.0 * sums[group].xtx / 100, rtol=1e-6)
    # one stored matrix per input group: members share it, in memory and in the file
    assert loaded["q"].data_ptr() == loaded["v"].data_ptr()
    assert os.path.getsize(path) < 1.5 * 4 * (16 * 16 + 24 * 24) + 4096
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_prefix_dtype_and_errors():
    sums = random_sums()
    covs = corda_covariances(sums, prefix="model.", dtype=torch.float64)
    assert set(covs) == {"model.q", "model.k", "model.v", "model.down"} and covs["model.q"].dtype == torch.float64
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        corda_covariances(sums, scale=0)


def corda_model(model, path, run_model=None):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                        corda_config=CordaConfig(covariance_file=str(path), corda_method="ipm"))
    preprocess_corda(model, config, run_model=run_model)
    return get_peft_model(model, config)


def test_peft_corda_builds_from_our_file_without_running_the_model(tmp_path):
    pytest.importorskip("peft.tuners.lora.corda", reason="this peft has no CorDA (or its imports are missing)")
    torch.set_num_threads(1)
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(2))
    stats = sensitivity_lora.calibrate(model, [{"input_ids": ids}], hessian="full", progress=False)
    from sensitivity_lora.init import group_sums_from_statistics

    path = write_corda_covariance_file(tmp_path / "cov.pt", group_sums_from_statistics(stats))

    ours = corda_model(copy.deepcopy(model), path)  # run_model=None: PEFT must read the file

    # CorDA's own collection on the same (single, unpadded) sequence: per call XᵀX / |max X|², a
    # different constant per module. B·A and the residual weight do not depend on that constant.
    def run(m):
        return lambda: m(input_ids=ids)

    own_model = copy.deepcopy(model)
    own = corda_model(own_model, tmp_path / "own.pt", run_model=run(own_model))
    from peft.tuners.lora import LoraLayer

    mine, theirs = dict(ours.named_modules()), dict(own.named_modules())
    layers = [n for n, mod in mine.items() if isinstance(mod, LoraLayer)]
    assert len(layers) == 14
    for name in layers:
        a, b = mine[name], theirs[name]
        delta_a = a.scaling["default"] * a.lora_B["default"].weight @ a.lora_A["default"].weight
        delta_b = b.scaling["default"] * b.lora_B["default"].weight @ b.lora_A["default"].weight
        # fp32 inverse of an ill-conditioned covariance (o_proj: GQA outputs) leaves 1e-5..5e-4 relative
        assert torch.allclose(delta_a, delta_b, atol=2e-3 * float(delta_b.abs().max()))
        assert torch.allclose(a.get_base_layer().weight, b.get_base_layer().weight, atol=1e-4)
    # the files hold the same matrices up to one factor per module
    own_file = torch.load(tmp_path / "own.pt", weights_only=True)
    our_file = torch.load(path, weights_only=True)
    for name, cov in our_file.items():
        theirs_cov, ours_cov = own_file[name].double(), cov.double()
        factor = theirs_cov.trace() / ours_cov.trace()  # T / |max x|² for this module
        assert torch.allclose(theirs_cov, factor * ours_cov, atol=1e-5 * float(theirs_cov.abs().max()))
