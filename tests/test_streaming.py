"""Streaming calibration: equal to the one-pass hooks, one block alive at a time, resumable, model unchanged."""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch

from conftest import random_batches, tiny_bert, tiny_gpt2, tiny_llama
from sensitivity_lora.calibration import streaming
from sensitivity_lora.calibration.one_pass import calibrate
from sensitivity_lora.api import compute_allocation
from sensitivity_lora.calibration.checkpoint import BlockCheckpoint
from sensitivity_lora.errors import CheckpointMismatchError, CalibrationError
from sensitivity_lora.calibration.statistics import GroupStatistics
from sensitivity_lora.calibration.streaming import iter_block_statistics


pytestmark = pytest.mark.filterwarnings("ignore:sensitivity_lora._C is not built")


def tiny_qwen2_sliding(seed: int = 0):
    """Layers 1-2 use a sliding window: their attention mask differs from layer 0's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, use_sliding_window=True, sliding_window=3, max_window_layers=1,
                      layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    return Qwen2ForCausalLM(cfg).eval()


def tiny_mistral(seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    return MistralForCausalLM(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "qwen2-sliding": tiny_qwen2_sliding,
          "mistral": tiny_mistral}


def merged(blocks) -> dict[str, GroupStatistics]:
    groups: dict[str, GroupStatistics] = {}
    for block in blocks:
        groups.update(block.stats.groups)
    return groups


def assert_same_statistics(one, groups: dict[str, GroupStatistics], exact: bool = True) -> None:
    assert list(groups) == list(one.groups)
    for name, g in one.groups.items():
        h = groups[name]
        assert (h.members, h.n_tokens, h.n_sequences, h.mode) == (g.members, g.n_tokens, g.n_sequences, g.mode)
        pairs = [(g.sumsq, h.sumsq), (g.sum, h.sum)] + ([(g.raw_xtx(), h.raw_xtx())] if g.mode == "full" else [])
        for a, b in pairs:
            if exact:
                assert torch.equal(a, b), f"{name}: max diff {(a - b).abs().max()}"
            else:
                torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10 * float(a.abs().max()))


@pytest.mark.parametrize("hessian", ["diag", "full"])
@pytest.mark.parametrize("family", list(MODELS))
def test_streaming_equals_one_pass(family, hessian):
    model = MODELS[family]()
    batches = random_batches(2, seed=7)
    one = calibrate(model, batches, hessian=hessian, progress=False)
    blocks = list(iter_block_statistics(model, batches, hessian=hessian, progress=False))
    assert [b.index for b in blocks] == list(range(len(blocks))) and len(blocks) >= 2
    assert_same_statistics(one, merged(blocks))
    for block in blocks:  # each block's statistics describe that block's modules only
        assert all(f".{block.index}." in name for name in block.stats.dims)


def test_sliding_window_layers_get_their_own_mask():
    """Replaying layer 0's arguments for every layer would be wrong here; the stubs record each layer's own."""
    model = tiny_qwen2_sliding()
    batches = random_batches(1, seq=12, pad=False)
    blocks = list(iter_block_statistics(model, batches, hessian="diag", progress=False))
    with streaming._stubbed_blocks(model.model.layers, 2, records := []):
        with torch.no_grad():
            try:
                model(**batches[0], use_cache=False)
            except streaming._StopForward:
                pass
    masks = [r[3]["attention_mask"] for r in records]
    assert masks[1] is masks[2] and masks[1] is not None  # the sliding-window mask, shared by layers 1 and 2
    assert masks[0] is None or not torch.equal(masks[0], masks[1])  # layer 0: plain causal
    assert_same_statistics(calibrate(model, batches, progress=False), merged(blocks))


def test_allocation_streaming_equals_compute_allocation():

    model, batches = tiny_llama(), random_batches(3)
    for kwargs in ({}, {"hessian": "full", "scope": "eigen"}, {"method": "pra"}):
        expected = compute_allocation(model, batches, avg_rank=4, progress=False, **kwargs)
        got = compute_allocation(model, batches, avg_rank=4, streaming=True, progress=False, **kwargs)
        assert got.to_dict() == expected.to_dict()


def test_one_block_of_hessians_alive_at_a_time(monkeypatch):
    alive: list[weakref.ref] = []
    original = GroupStatistics.__post_init__

    def tracked(self):
        original(self)
        alive.append(weakref.ref(self))

    monkeypatch.setattr(GroupStatistics, "__post_init__", tracked)
    model = tiny_llama()
    model.model.layers.append(type(model.model.layers[0])(model.config, 2))  # three blocks
    model.config.num_hidden_layers = 3
    during: list[int] = []  # live accumulators whenever a block starts on a batch

    def count(*_):
        gc.collect()
        during.append(sum(ref() is not None for ref in alive))

    handles = [layer.register_forward_pre_hook(count) for layer in model.model.layers]
    for block in iter_block_statistics(model, random_batches(3), hessian="full", progress=False):
        gc.collect()
        live = sum(ref() is not None for ref in alive)
        assert live == len(block.stats.groups) == 4, f"block {block.index}: {live} accumulators alive"
        block.stats = None  # what the consumers do before asking for the next block
    # per block: 3 batches; before the 1st nothing is alive, before the 2nd and 3rd this block's 4 groups
    assert during[-9:] == [0, 4, 4] * 3 and len(alive) == 12
    # the allocation path scores each block and lets it go before the next one starts
    during.clear()
    compute_allocation(model, random_batches(3), avg_rank=4, hessian="full", streaming=True, progress=False)
    assert during[-9:] == [0, 4, 4] * 3
    # so does the initialisation: each block's groups are decomposed and let go before the next block
    for init in ("covariance", "eva", "output-aware"):
        during.clear()
        compute_allocation(model, random_batches(3), avg_rank=4, init=init, streaming=True, progress=False)
        assert during[-9:] == [0, 4, 4] * 3, init
    for h in handles:
        h.remove()


class _Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(width, 2 * width), torch.nn.Linear(2 * width, width)

    def forward(self, hidden):
        return hidden + self.down(torch.relu(self.up(hidden)))


class _PlainModel(torch.nn.Module):
    """Not a transformers model: blocks in a ModuleList, a per-token head after them."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(128, width)
        self.layers = torch.nn.ModuleList([_Block(width) for _ in range(3)])
        self.head = torch.nn.Linear(width, 8)

    def forward(self, input_ids, attention_mask=None):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.head(hidden)


def test_generic_blocks_of_a_plain_torch_model():
    model, batches = _PlainModel(), random_batches(2)
    blocks = list(iter_block_statistics(model, batches, hessian="full", progress=False))
    assert [b.index for b in blocks] == [0, 1, 2]
    assert_same_statistics(calibrate(model, batches, hessian="full", progress=False), merged(blocks))


def test_fallback_to_one_pass_when_targets_leave_the_blocks():
    model, batches = _PlainModel(), random_batches(2)
    targets = ["up", "head"]
    with pytest.warns(UserWarning, match="head is outside the blocks"):
        blocks = list(iter_block_statistics(model, batches, targets, progress=False))
    assert [b.index for b in blocks] == [-1]
    assert_same_statistics(calibrate(model, batches, targets, progress=False), merged(blocks))


def test_fallback_when_no_block_list():
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.proj = torch.nn.Embedding(128, 16), torch.nn.Linear(16, 8)

        def forward(self, input_ids, attention_mask=None):
            return self.proj(self.embed(input_ids))

    with pytest.warns(UserWarning, match="no list of transformer blocks"):
        blocks = list(iter_block_statistics(Flat(), random_batches(1), ["proj"], progress=False))
    assert blocks[0].index == -1 and list(blocks[0].stats.dims) == ["proj"]


def test_blocks_after_the_last_target_are_not_run(monkeypatch):
    model, batches = tiny_llama(), random_batches(1)
    ran = []
    original = streaming._run_block
    monkeypatch.setattr(streaming, "_run_block", lambda block, index, *a: (ran.append(index), original(block, index, *a)))
    blocks = list(iter_block_statistics(model, batches, r"model\.layers\.0\.mlp\.down_proj", progress=False))
    assert ran == [0] and [b.index for b in blocks] == [0]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def test_model_unchanged_also_on_error(monkeypatch):
    model = tiny_llama().train()
    weights, modes = _snapshot(model)
    list(iter_block_statistics(model, random_batches(2), hessian="full", progress=False))

    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(streaming, "_run_block", boom)
    with pytest.raises(RuntimeError, match="boom"):
        list(iter_block_statistics(model, random_batches(2), progress=False))
    after, after_modes = _snapshot(model)
    assert after_modes == modes and all(torch.equal(after[k], weights[k]) for k in weights)
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_bad_input_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="hessian must be one of"):
        list(iter_block_statistics(model, random_batches(1), hessian="dense"))
    with pytest.raises(CalibrationError, match="no calibration batches"):
        list(iter_block_statistics(model, [], progress=False))


# ---------------------------------------------------------------- resume

class _Killed(BaseException):
    """Stands for an interruption (Ctrl-C, a crash) that no `except Exception` swallows."""


def _crash_at_block(monkeypatch, k: int) -> None:
    original = streaming._run_block

    def crashing(block, index, *args):
        if index == k:
            raise _Killed(f"killed in block {k}")
        return original(block, index, *args)

    monkeypatch.setattr(streaming, "_run_block", crashing)


def _three_block_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("hessian", ["diag", "full"])
def test_killed_after_block_k_resumes_to_the_same_result(tmp_path, monkeypatch, hessian):
    model, batches = _three_block_llama(), random_batches(3)
    expected = merged(iter_block_statistics(model, batches, hessian=hessian, progress=False))
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as m:
        _crash_at_block(m, 2)  # blocks 0 and 1 finished, killed inside block 2
        with pytest.raises(_Killed):
            for block in iter_block_statistics(model, batches, hessian=hessian, progress=False,
                                               checkpoint=BlockCheckpoint(ckpt)):
                pass
    assert sorted(p.name for p in ckpt.glob("block_*")) == ["block_00000.safetensors", "block_00001.safetensors"]
    computed = []
    original = streaming.StatisticsHooks
    monkeypatch.setattr(streaming, "StatisticsHooks", lambda mods, *a: (computed.append(next(iter(mods))), original(mods, *a))[1])
    blocks = list(iter_block_statistics(model, batches, hessian=hessian, progress=False, checkpoint=BlockCheckpoint(ckpt)))
    assert [(b.index, b.from_checkpoint) for b in blocks] == [(0, True), (1, True), (2, False)]
    assert computed == ["model.layers.2.self_attn.q_proj"]  # only the unfinished block was measured again
    assert_same_statistics(_as_stats(expected), merged(blocks))


def _as_stats(groups):
    from sensitivity_lora.calibration.statistics import CalibrationStatistics

    return CalibrationStatistics(groups, {}, {}, next(iter(groups.values())).mode)


def test_resumed_allocation_equals_uninterrupted(tmp_path, monkeypatch):
    model, batches = _three_block_llama(), random_batches(3)
    expected = compute_allocation(model, batches, avg_rank=4, streaming=True, progress=False)
    with monkeypatch.context() as m:
        _crash_at_block(m, 1)
        with pytest.raises(_Killed):
            compute_allocation(model, batches, avg_rank=4, streaming=True, progress=False, checkpoint_dir=tmp_path)
    got = compute_allocation(model, batches, avg_rank=4, streaming=True, progress=False, checkpoint_dir=tmp_path)
    assert got.to_dict() == expected.to_dict()


def test_resume_with_other_data_is_refused(tmp_path):
    model = tiny_llama()
    list(iter_block_statistics(model, random_batches(2, seed=1), progress=False, checkpoint=BlockCheckpoint(tmp_path)))
    with pytest.raises(CheckpointMismatchError, match="data"):
        list(iter_block_statistics(model, random_batches(2, seed=2), progress=False, checkpoint=BlockCheckpoint(tmp_path)))
    with pytest.raises(CheckpointMismatchError, match="the Hessian mode"):
        list(iter_block_statistics(model, random_batches(2, seed=1), hessian="full", progress=False,
                                   checkpoint=BlockCheckpoint(tmp_path)))


_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    from conftest import random_batches
    from test_streaming import _three_block_llama
    from sensitivity_lora.calibration.checkpoint import BlockCheckpoint
    from sensitivity_lora.calibration.streaming import iter_block_statistics

    torch.set_num_threads(1)
    kill_after = int(sys.argv[2])
    ckpt = BlockCheckpoint(sys.argv[1])
    original = ckpt.save
    def save(index, stats):
        original(index, stats)
        if index == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handlers
    ckpt.save = save
    for block in iter_block_statistics(_three_block_llama(), random_batches(3), hessian="full", progress=False,
                                       checkpoint=ckpt):
        pass
""")


def test_hard_kill_after_block_k_then_resume(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_KILLED_RUN.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), "1"], env=env, timeout=240,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    model, batches = _three_block_llama(), random_batches(3)
    blocks = list(iter_block_statistics(model, batches, hessian="full", progress=False,
                                        checkpoint=BlockCheckpoint(tmp_path / "ckpt")))
    assert [(b.index, b.from_checkpoint) for b in blocks] == [(0, True), (1, True), (2, False)]
    assert_same_statistics(calibrate(model, batches, hessian="full", progress=False), merged(blocks))
