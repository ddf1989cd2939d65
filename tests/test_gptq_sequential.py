"""The sequential mode: each block's statistics come from the inputs the already-changed blocks produce.

The oracle is a hand-written loop: run the whole model (plain forward, fp64 outer products of each target's
masked inputs), round-to-nearest quantise the next block's targets, repeat.
"""
from __future__ import annotations

import pytest
import torch

from conftest import random_batches, tiny_gpt2, tiny_llama
from sensitivity_lora.calibration.streaming import iter_block_statistics
from sensitivity_lora.calibration.targets import module_dims, module_weight, resolve_targets
from sensitivity_lora.errors import CalibrationError


def rtn_(module: torch.nn.Module, bits: int = 3) -> None:
    """Symmetric per-row round-to-nearest, written into the weight in place."""
    with torch.no_grad():
        w = module_weight(module)
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / (2 ** (bits - 1) - 1)
        w.copy_((w / scale).round().clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale)


def block_of(name: str) -> int:
    parts = name.split(".")
    return int(next(p for p in parts if p.isdigit()))


def oracle(model, batches, names) -> dict[str, torch.Tensor]:
    """Σxxᵀ of every target, block by block, each block quantised after its inputs were measured."""
    lookup = dict(model.named_modules())
    result: dict[str, torch.Tensor] = {}
    for index in sorted({block_of(n) for n in names}):
        block_names = [n for n in names if block_of(n) == index]
        sums = {n: torch.zeros(module_dims(lookup[n])[0], module_dims(lookup[n])[0], dtype=torch.float64)
                for n in block_names}
        mask_now: list[torch.Tensor] = []

        def hook(name):
            def fn(_module, args):
                x = args[0].reshape(-1, args[0].shape[-1]).double()[mask_now[0].reshape(-1)]
                sums[name] += x.T @ x
            return fn

        handles = [lookup[n].register_forward_pre_hook(hook(n)) for n in block_names]
        with torch.no_grad():
            for batch in batches:
                mask_now[:] = [batch["attention_mask"].bool()]
                model(**batch)
        for h in handles:
            h.remove()
        result.update(sums)
        for n in block_names:
            rtn_(lookup[n])
    return result


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_sequential_equals_a_hand_written_quantise_as_you_go_loop(make_model):
    batches = random_batches(2)
    model, reference = make_model(), make_model()
    names = resolve_targets(model)
    expected = oracle(reference, batches, names)
    lookup = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}
    for block in iter_block_statistics(model, batches, hessian="full", sequential=True, progress=False):
        assert block.block is not None and block.index >= 0
        for group in block.stats.groups.values():
            for member in group.members:
                got[member] = group.raw_xtx().clone()
                rtn_(lookup[member])
    assert set(got) == set(names)
    for name in names:  # fp32 products combined in fp64 against the fp64 oracle, as in test_hessian_io
        torch.testing.assert_close(got[name], expected[name], rtol=2e-5, atol=2e-5 * float(expected[name].abs().max()))
    # the consumer's changes are kept: the model ends quantised exactly like the oracle's
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), n
    # and the later blocks' statistics really differ from a one-shot pass over the unchanged model
    one_shot = {m: g.raw_xtx() for b in iter_block_statistics(make_model(), batches, hessian="full", progress=False)
                for g in b.stats.groups.values() for m in g.members}
    last = names[-1]
    assert not torch.allclose(one_shot[last], got[last], rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to offload the weights to")
def test_sequential_keeps_changes_with_weights_offloaded_to_another_device():
    """device != the model's device: the block is changed where it runs, and the values come home."""
    batches = random_batches(1)
    model, reference = tiny_llama(), tiny_llama()
    before = {n: p for n, p in model.named_parameters()}
    names = resolve_targets(model)
    expected = oracle(reference, batches, names)
    lookup = dict(model.named_modules())
    got = {}
    for block in iter_block_statistics(model, batches, hessian="full", sequential=True, progress=False,
                                       device="cuda", backend="reference"):
        for group in block.stats.groups.values():
            for member in group.members:
                got[member] = group.raw_xtx().cpu()
                rtn_(lookup[member])  # on the GPU copy of the block
    for name in names:  # TF32 is off by default for fp32 matmuls in torch; the blocks run in fp32
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4)
    assert all(p is before[n] and p.device.type == "cpu" for n, p in model.named_parameters())
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)


def test_rebinding_a_parameter_is_refused_and_the_model_restored():
    model, batches = tiny_llama(), random_batches(1)
    original = model.model.layers[0].self_attn.q_proj.weight.data.clone()
    blocks = iter_block_statistics(model, batches, sequential=True, progress=False)
    block = next(blocks)
    block.block.self_attn.q_proj.weight.data = torch.zeros_like(original)
    with pytest.raises(CalibrationError, match="in place"):
        next(blocks)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, original)


def test_sequential_needs_streaming_and_no_checkpoint(tmp_path):
    from sensitivity_lora.calibration.checkpoint import BlockCheckpoint

    model, batches = tiny_llama(), random_batches(1)
    with pytest.raises(ValueError, match="sequential"):
        next(iter_block_statistics(model, batches, streaming=False, sequential=True, progress=False))
    with pytest.raises(ValueError, match="sequential"):
        next(iter_block_statistics(model, batches, sequential=True, progress=False,
                                   checkpoint=BlockCheckpoint(tmp_path / "ck")))
    with pytest.raises(CalibrationError, match="sequential mode needs a model that streams"):
        next(iter_block_statistics(model, batches, "lm_head", sequential=True, progress=False))
