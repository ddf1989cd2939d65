"""Nothing mixed: a resumed or merged result is refused unless the model's weights and config, the data,
the settings and the package version are those it was started with; an export folder is never merged
without resume; two runs never share a folder; a set of outputs is committed all at once."""
from __future__ import annotations

import fcntl
import json

import pytest
import torch

from conftest import random_batches, tiny_llama
from model_snapshot import assert_unchanged, folder_bytes, hidden_entries, snapshot
from sensitivity_lora import compute_allocation, export_hessians, load_hessians
from sensitivity_lora.calibration import streaming
from sensitivity_lora.calibration.checkpoint import BlockCheckpoint
from sensitivity_lora.calibration.streaming import iter_block_statistics
from sensitivity_lora.errors import CheckpointMismatchError, OutputError, OutputExistsError, OutputInUseError
from sensitivity_lora.folders import JOURNAL_FILE, LOCK_FILE, FileSet, output_lock, pending_commit, recover

pytestmark = pytest.mark.filterwarnings("ignore:sensitivity_lora._C is not built")


def _three_blocks(seed=0, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, **config)
    return LlamaForCausalLM(cfg).eval()


class _Killed(BaseException):
    pass


def _interrupted(model, batches, folder, monkeypatch, at=1, **kwargs):
    """A streaming run into ``folder`` killed inside block ``at`` (blocks before it are checkpointed)."""
    original = streaming._run_block

    def crashing(block, index, *args):
        if index == at:
            raise _Killed
        return original(block, index, *args)

    with monkeypatch.context() as m:
        m.setattr(streaming, "_run_block", crashing)
        with pytest.raises(_Killed):
            for _ in iter_block_statistics(model, batches, progress=False, checkpoint=BlockCheckpoint(folder),
                                           **kwargs):
                pass


def _other_weights(model):
    other = _three_blocks(seed=1)  # same architecture, other weights
    return other


def _one_element_changed(model):
    other = _three_blocks()
    with torch.no_grad():
        other.model.layers[2].post_attention_layernorm.weight[3] += 1e-3  # after the finished blocks
    return other


def _other_config(model):
    other = _three_blocks(rms_norm_eps=1e-3)  # same weights, other config
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("change, match", [
    (_other_weights, "the model's weights"),
    (_one_element_changed, "the model's weights"),
    (_other_config, "the model's config"),
])
def test_resume_on_another_model_is_refused(tmp_path, monkeypatch, change, match):
    model, batches, folder = _three_blocks(), random_batches(2), tmp_path / "ckpt"
    _interrupted(model, batches, folder, monkeypatch)
    files = folder_bytes(folder)
    other = change(model)
    before = snapshot(other)
    with pytest.raises(CheckpointMismatchError, match=match):
        list(iter_block_statistics(other, batches, progress=False, checkpoint=BlockCheckpoint(folder)))
    assert folder_bytes(folder) == files  # the checkpoint is untouched
    assert_unchanged(before, other)
    assert hidden_entries(folder) == []  # the lock was released


def test_the_weights_digest_sees_one_element_off_the_sample():
    from sensitivity_lora.calibration.fingerprint import SAMPLE, weights_digest

    layer = torch.nn.Linear(1000, 1001)
    step = layer.weight.numel() // SAMPLE
    index = 517 * 1000 + 3
    assert step > 1 and index % step != 0  # not one of the sampled elements
    before = weights_digest(layer)
    with torch.no_grad():
        layer.weight.view(-1)[index] += 1e-6
    assert weights_digest(layer) != before
    assert weights_digest(layer) == weights_digest(layer)  # deterministic


@pytest.mark.parametrize("change, match", [
    (lambda: {"batches": random_batches(2, seed=9)}, "the calibration data"),
    (lambda: {"batches": random_batches(3)}, "the number of calibration batches"),
    (lambda: {"target_modules": ["q_proj", "v_proj"]}, "the target modules"),
    (lambda: {"hessian": "full"}, "the Hessian mode"),
    (lambda: {"fingerprint_extra": {"seq_len": 64}}, "the run's settings"),
])
def test_resume_with_other_data_or_settings_is_refused(tmp_path, monkeypatch, change, match):
    model, batches, folder = _three_blocks(), random_batches(2), tmp_path / "ckpt"
    _interrupted(model, batches, folder, monkeypatch, fingerprint_extra={"seq_len": 32})
    files = folder_bytes(folder)
    kwargs = {"batches": batches, "fingerprint_extra": {"seq_len": 32}, **change()}
    with pytest.raises(CheckpointMismatchError, match=match):
        list(iter_block_statistics(model, kwargs.pop("batches"), progress=False, checkpoint=BlockCheckpoint(folder),
                                   **kwargs))
    assert folder_bytes(folder) == files


def test_resume_under_another_package_version_is_refused(tmp_path, monkeypatch):
    import sensitivity_lora

    model, batches, folder = _three_blocks(), random_batches(2), tmp_path / "ckpt"
    _interrupted(model, batches, folder, monkeypatch)
    monkeypatch.setattr(sensitivity_lora, "__version__", "99.0")
    with pytest.raises(CheckpointMismatchError, match=r"the sensitivity-lora version \('0.1.0' → '99.0'\)"):
        list(iter_block_statistics(model, batches, progress=False, checkpoint=BlockCheckpoint(folder)))


def test_checkpoint_of_an_older_format_is_refused(tmp_path, monkeypatch):
    model, batches, folder = _three_blocks(), random_batches(2), tmp_path / "ckpt"
    _interrupted(model, batches, folder, monkeypatch)
    manifest = json.loads((folder / "manifest.json").read_text())
    for key in ("model_weights", "model_config", "package_version", "fingerprint_format"):
        del manifest["fingerprint"][key]  # what the manifests before this version held
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointMismatchError, match="the model's weights \\(not recorded by the earlier run\\)"):
        list(iter_block_statistics(model, batches, progress=False, checkpoint=BlockCheckpoint(folder)))


def test_resumed_allocation_on_another_model_is_refused(tmp_path, monkeypatch):
    model, batches = _three_blocks(), random_batches(2)
    _interrupted(model, batches, tmp_path, monkeypatch)
    with pytest.raises(CheckpointMismatchError, match="the model's weights"):
        compute_allocation(_three_blocks(seed=3), batches, progress=False, checkpoint_dir=tmp_path)


def test_same_run_resumes_to_the_same_allocation(tmp_path, monkeypatch):
    model, batches = _three_blocks(), random_batches(2)
    expected = compute_allocation(model, batches, avg_rank=4, progress=False, streaming=True)
    _interrupted(model, batches, tmp_path, monkeypatch, at=2)
    assert compute_allocation(model, batches, avg_rank=4, progress=False, checkpoint_dir=tmp_path).to_dict() == \
        expected.to_dict()


# ---------------------------------------------------------------- exports

def _interrupted_export(model, batches, out, monkeypatch):
    original = streaming._run_block

    def crashing(block, index, *args):
        if index == 1:
            raise _Killed
        return original(block, index, *args)

    with monkeypatch.context() as m:
        m.setattr(streaming, "_run_block", crashing)
        with pytest.raises(_Killed):
            export_hessians(model, batches, out, progress=False)


def test_export_resume_on_another_model_is_refused_and_touches_nothing(tmp_path, monkeypatch):
    model, batches, out = _three_blocks(), random_batches(2), tmp_path / "h"
    _interrupted_export(model, batches, out, monkeypatch)
    files = folder_bytes(out)
    with pytest.raises(CheckpointMismatchError, match="the model's weights"):
        export_hessians(_three_blocks(seed=1), batches, out, resume=True, progress=False)
    assert folder_bytes(out) == files


def test_an_export_folder_in_use_is_never_merged_without_resume(tmp_path):
    out = tmp_path / "h"
    export_hessians(tiny_llama(), random_batches(2), out, progress=False)
    files = folder_bytes(out)
    with pytest.raises(OutputExistsError, match="already holds a Hessian export.*--resume.*--overwrite"):
        export_hessians(tiny_llama(seed=5), random_batches(2), out, progress=False)
    assert folder_bytes(out) == files


def test_overwrite_replaces_the_old_export_entirely(tmp_path):
    out = tmp_path / "h"
    export_hessians(tiny_llama(), random_batches(2), out, progress=False)  # every linear layer
    export_hessians(tiny_llama(seed=5), random_batches(2), out, target_modules=["q_proj"], overwrite=True,
                    progress=False)
    loaded = load_hessians(out)
    assert sorted(loaded) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    listed = set(json.loads((out / "index.json").read_text())["groups"].values())
    assert {p.name for p in out.glob("*.safetensors")} == listed  # no file of the old export is left


def test_resume_of_an_export_without_checkpoint_is_refused(tmp_path):
    out = tmp_path / "h"
    export_hessians(tiny_llama(), random_batches(2), out, streaming=False, progress=False)
    with pytest.raises(CheckpointMismatchError, match="no checkpoint.*cannot be resumed"):
        export_hessians(tiny_llama(), random_batches(2), out, resume=True, progress=False)


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="exclude each other"):
        export_hessians(tiny_llama(), random_batches(1), tmp_path, resume=True, overwrite=True, progress=False)


def test_resumed_export_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    model, batches = _three_blocks(), random_batches(2)
    export_hessians(model, batches, tmp_path / "whole", progress=False)
    _interrupted_export(model, batches, tmp_path / "resumed", monkeypatch)
    export_hessians(model, batches, tmp_path / "resumed", resume=True, progress=False)
    whole, resumed = folder_bytes(tmp_path / "whole"), folder_bytes(tmp_path / "resumed")
    assert {k: v for k, v in whole.items() if k.endswith(".safetensors") and "/" not in k} == \
        {k: v for k, v in resumed.items() if k.endswith(".safetensors") and "/" not in k}  # byte for byte
    assert json.loads(whole["index.json"]) == json.loads(resumed["index.json"])


def test_export_into_a_file_is_an_output_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        export_hessians(tiny_llama(), random_batches(1), target, progress=False)
    assert target.read_text() == "x"


# ---------------------------------------------------------------- locks

def _hold_lock(folder):
    """Another process's lock, as the system sees it (a second open file description)."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "a+")
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def test_a_locked_checkpoint_folder_is_refused(tmp_path):
    handle = _hold_lock(tmp_path / "ckpt")
    try:
        with pytest.raises(OutputInUseError, match="in use by another sensitivity-lora run"):
            list(iter_block_statistics(tiny_llama(), random_batches(1), progress=False,
                                       checkpoint=BlockCheckpoint(tmp_path / "ckpt")))
        assert not (tmp_path / "ckpt" / "manifest.json").exists()
    finally:
        handle.close()


def test_a_locked_export_folder_is_refused(tmp_path):
    handle = _hold_lock(tmp_path / "h")
    try:
        with pytest.raises(OutputInUseError, match="in use"):
            export_hessians(tiny_llama(), random_batches(1), tmp_path / "h", progress=False)
        assert not (tmp_path / "h" / "index.json").exists()
    finally:
        handle.close()


def test_the_lock_is_released_and_reentrant(tmp_path):
    with output_lock(tmp_path) as folder, output_lock(tmp_path):  # one process may nest it
        assert (folder / LOCK_FILE).read_text().startswith("pid ")
    assert not (tmp_path / LOCK_FILE).exists()
    with output_lock(tmp_path):  # and take it again afterwards
        pass


# ---------------------------------------------------------------- file sets

def _old_set(folder):
    with output_lock(folder), FileSet(folder, replaces=["a.json", "b.json", "c.png"]) as files:
        files.write_text("a.json", "old a")
        files.write_text("b.json", "old b")
        files.write_text("c.png", "old c")
        files.commit()


def test_a_file_set_is_invisible_until_committed(tmp_path):
    _old_set(tmp_path)
    with pytest.raises(RuntimeError, match="late failure"):
        with output_lock(tmp_path), FileSet(tmp_path, replaces=["a.json", "b.json", "c.png"]) as files:
            files.write_text("a.json", "new a")
            files.write_text("b.json", "new b")
            raise RuntimeError("late failure")
    assert folder_bytes(tmp_path) == {"a.json": b"old a", "b.json": b"old b", "c.png": b"old c"}
    assert hidden_entries(tmp_path) == []


def test_a_commit_removes_the_old_files_the_new_set_lacks(tmp_path):
    _old_set(tmp_path)
    with output_lock(tmp_path), FileSet(tmp_path, replaces=["a.json", "b.json", "c.png"]) as files:
        files.write_text("a.json", "new a")
        files.write_text("b.json", "new b")
        files.commit()
    assert folder_bytes(tmp_path) == {"a.json": b"new a", "b.json": b"new b"}


def test_a_commit_killed_halfway_is_finished_by_the_next_run(tmp_path, monkeypatch):
    import os

    _old_set(tmp_path)
    renames = {"n": 0}
    real = os.replace

    def dying(src, dst):
        if str(dst).endswith((".json", ".png")) and JOURNAL_FILE not in str(dst) and "staging" not in str(dst):
            renames["n"] += 1
            if renames["n"] == 2:
                raise _Killed  # the process dies between two renames of the commit
        return real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", dying)
        with pytest.raises(_Killed):
            with output_lock(tmp_path):
                files = FileSet(tmp_path, replaces=["a.json", "b.json", "c.png"])
                files.write_text("a.json", "new a")
                files.write_text("b.json", "new b")
                files.write_text("c.png", "new c")
                files.commit()
    assert pending_commit(tmp_path)  # half of the renames done: the journal says how to finish
    with output_lock(tmp_path):
        recover(tmp_path)
    assert folder_bytes(tmp_path) == {"a.json": b"new a", "b.json": b"new b", "c.png": b"new c"}
    assert hidden_entries(tmp_path) == []


def test_stale_staging_of_a_killed_run_is_removed(tmp_path):
    _old_set(tmp_path)
    files = FileSet(tmp_path)  # staged, never committed nor discarded: a run killed before its commit
    files.write_text("a.json", "half")
    assert len(hidden_entries(tmp_path)) == 1
    with output_lock(tmp_path):
        recover(tmp_path)
    assert hidden_entries(tmp_path) == []
    assert folder_bytes(tmp_path)["a.json"] == b"old a"


def test_a_resumed_run_removes_the_temporaries_a_killed_write_left(tmp_path, monkeypatch):
    model, batches, folder = _three_blocks(), random_batches(), tmp_path / "ckpt"
    _interrupted(model, batches, folder, monkeypatch, at=2)
    # what a kill between atomic_write's temporary file and its rename leaves behind
    stale = [folder / ".block_00002.safetensors.k3j9x1.tmp", folder / ".manifest.json.q8w2e7.tmp"]
    for path in stale:
        path.write_bytes(b"half a block")
    unrelated = folder / ".notes.txt.a1b2c3.tmp"
    unrelated.write_bytes(b"not ours")
    resumed = [s for s in iter_block_statistics(model, batches, progress=False, checkpoint=BlockCheckpoint(folder))]
    fresh = list(iter_block_statistics(model, batches, progress=False))
    assert not any(p.exists() for p in stale) and unrelated.exists()
    assert [b.index for b in resumed] == [b.index for b in fresh] and resumed[2].from_checkpoint is False
    for a, b in zip(resumed, fresh):
        assert set(a.stats.groups) == set(b.stats.groups)


def test_a_folder_written_by_a_library_call_lands_whole_or_not_at_all(tmp_path):
    from sensitivity_lora.folders import write_folder_whole

    folder = tmp_path / "adapter"
    folder.mkdir()
    for name, text in {"adapter_config.json": "old", "adapter_model.bin": "old weights", "notes.txt": "mine"}.items():
        (folder / name).write_text(text)
    before = folder_bytes(folder)

    def torn(staging):  # one file written, then the writer dies
        (staging / "adapter_config.json").write_text("new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder_whole(folder, torn, ("adapter_config.json", "adapter_model.bin"))
    assert folder_bytes(folder) == before and not hidden_entries(folder)
    for bad, match in ((lambda staging: None, "no file"), (lambda staging: (staging / "sub").mkdir(), "sub-folder")):
        with pytest.raises(RuntimeError, match=match):
            write_folder_whole(folder, bad, ("adapter_config.json",))
        assert folder_bytes(folder) == before and not hidden_entries(folder)

    def save(staging):
        (staging / "adapter_config.json").write_text("new")
        (staging / "adapter_model.safetensors").write_text("new weights")

    write_folder_whole(folder, save, ("adapter_config.json", "adapter_model.bin", "adapter_model.safetensors"))
    after = {p.name: p.read_text() for p in folder.iterdir()}
    # the superseded .bin of the old set is gone; a file that is not the writer's stays
    assert after == {"adapter_config.json": "new", "adapter_model.safetensors": "new weights", "notes.txt": "mine"}
