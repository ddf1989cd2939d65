"""Hessian export: files equal an fp64 recomputation from the captured inputs, conventions, resume, no pickle."""
from __future__ import annotations

import json

import pytest
import torch

from oracles import captured_inputs
from conftest import random_batches, tiny_gpt2, tiny_llama
from sensitivity_lora.calibration import streaming
from sensitivity_lora.errors import FileFormatError
from sensitivity_lora.hessians.format import read_index, save_group
from sensitivity_lora.hessians import export_hessians, load_hessian, load_hessians


pytestmark = pytest.mark.filterwarnings("ignore:sensitivity_lora._C is not built")


def oracle_xtx(model, batches, names) -> dict[str, tuple[torch.Tensor, int, int]]:
    """Σ x xᵀ over non-padding tokens in fp64, the token and sequence counts, from plainly captured inputs."""
    sums = {n: x.T @ x for n, x in captured_inputs(model, batches, names).items()}
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    seqs = sum(int(b["input_ids"].shape[0]) for b in batches)
    return {n: (s, tokens, seqs) for n, s in sums.items()}


FACTORS = {"2/tokens": lambda t, s: 2 / t, "2/sequences": lambda t, s: 2 / s, "1/tokens": lambda t, s: 1 / t,
           "sum": lambda t, s: 1.0}


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "one-pass"])
def test_exported_hessians_equal_fp64_recomputation(tmp_path, make_model, stream):
    model = make_model()
    batches = random_batches(3, seed=11)  # padded rows: padding must be excluded
    export_hessians(model, batches, tmp_path, streaming=stream, progress=False)
    oracle = oracle_xtx(model, batches, list(load_hessians(tmp_path)))
    for convention, factor in FACTORS.items():
        loaded = load_hessians(tmp_path, convention=convention)
        assert set(loaded) == set(oracle)
        for name, (xtx, tokens, seqs) in oracle.items():
            h = loaded[name]
            assert name in h.members and (h.n_tokens, h.n_sequences) == (tokens, seqs)
            expected = xtx * factor(tokens, seqs)
            # fp32 products of fp32 activations, combined in fp64: fp32-level agreement with the fp64 oracle
            torch.testing.assert_close(h.hessian, expected, rtol=2e-5, atol=2e-5 * float(expected.abs().max()))
            torch.testing.assert_close(h.diag, expected.diagonal(), rtol=2e-5, atol=2e-5 * float(expected.abs().max()))
            assert torch.equal(h.hessian, h.hessian.T) and h.hessian.dtype == torch.float64


def test_files_are_plain_safetensors_with_metadata(tmp_path):
    from safetensors import safe_open

    model = tiny_llama()
    export_hessians(model, random_batches(2), tmp_path, progress=False)
    index = json.loads((tmp_path / "index.json").read_text())
    assert len(index["groups"]) == 8 and len(index["modules"]) == 14
    assert {p.suffix for p in tmp_path.iterdir() if p.is_file()} == {".json", ".safetensors"}  # nothing pickled
    path = tmp_path / index["groups"]["model.layers.0.self_attn.q_proj"]
    with safe_open(str(path), framework="pt") as f:  # what another tool sees, without this package
        meta = f.metadata()
        assert set(f.keys()) == {"xtx", "sumsq", "sum"} and f.get_tensor("xtx").shape == (32, 32)
    assert meta["normalisation"] == "2/tokens" and meta["stored"] == "raw_sum"
    assert json.loads(meta["members"]) == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert json.loads(meta["member_dims"])["model.layers.0.self_attn.k_proj"] == [32, 16]
    assert int(meta["n_tokens"]) == sum(int(b["attention_mask"].sum()) for b in random_batches(2))


def test_diag_export_and_its_limits(tmp_path):
    model = tiny_llama()
    export_hessians(model, random_batches(2), tmp_path, hessian="diag", progress=False)
    h = load_hessians(tmp_path)["model.layers.1.mlp.down_proj"]
    assert h.raw_xtx is None and h.diag.shape == (48,)
    with pytest.raises(ValueError, match="only the diagonal"):
        h.hessian
    stats = h.statistics()
    assert stats.mode == "diag" and torch.equal(stats.hessian_diag(), h.diag)


def test_loader_errors(tmp_path):
    export_hessians(tiny_llama(), random_batches(1), tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown normalisation"):
        load_hessians(tmp_path, convention="1/sequences")
    with pytest.raises(FileNotFoundError, match="index.json"):
        load_hessians(tmp_path / "nope")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a sensitivity-lora Hessian file"):
        load_hessian(tmp_path / "other.safetensors")


def test_interrupted_export_resumes_to_the_same_files(tmp_path, monkeypatch):
    model, batches = tiny_llama(), random_batches(3)
    export_hessians(model, batches, tmp_path / "full", progress=False)
    original = streaming._run_block

    def crashing(block, index, *args):
        if index == 1:
            raise RuntimeError("killed")
        return original(block, index, *args)

    with monkeypatch.context() as m:
        m.setattr(streaming, "_run_block", crashing)
        with pytest.raises(RuntimeError, match="killed"):
            export_hessians(model, batches, tmp_path / "resumed", resume=True, progress=False)
    index = read_index(tmp_path / "resumed")
    assert len(index["groups"]) == 4 and index["complete"] is False  # block 0 only, and marked unfinished
    with pytest.raises(FileFormatError, match="incomplete"):
        load_hessians(tmp_path / "resumed")
    measured = []
    hooks = streaming.StatisticsHooks
    monkeypatch.setattr(streaming, "StatisticsHooks", lambda mods, *a: (measured.append(next(iter(mods))), hooks(mods, *a))[1])
    export_hessians(model, batches, tmp_path / "resumed", resume=True, progress=False)
    assert measured == ["model.layers.1.self_attn.q_proj"]
    a, b = load_hessians(tmp_path / "full", by="group"), load_hessians(tmp_path / "resumed", by="group")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name].raw_xtx, b[name].raw_xtx) and a[name].n_tokens == b[name].n_tokens


def test_group_round_trip_keeps_statistics(tmp_path):
    from sensitivity_lora.calibration.one_pass import calibrate

    stats = calibrate(tiny_llama(), random_batches(2), hessian="full", progress=False)
    group = stats.groups["model.layers.0.mlp.gate_proj"]
    save_group(tmp_path / "g.safetensors", group, stats.dims)
    back = load_hessian(tmp_path / "g.safetensors").statistics()
    assert torch.equal(back.raw_xtx(), group.raw_xtx()) and torch.equal(back.sumsq, group.sumsq)
    assert (back.n_tokens, back.n_sequences, back.members) == (group.n_tokens, group.n_sequences, group.members)
    torch.testing.assert_close(back.cholesky()[0], group.cholesky()[0], rtol=0, atol=0)
