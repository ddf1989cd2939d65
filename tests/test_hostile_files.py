"""Hostile files: everything the package reads is checked, and a bad file is an error that names it.

Allocations (Allocation.load), Hessian exports (load_hessians: names inside the folder only, shapes,
dtypes, finite values, non-negative diagonals), streaming checkpoints, initial weights, calibration
text files (UTF-16/32, binary) and model folders (missing, truncated or partial weights).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_batches, tiny_llama
from model_snapshot import assert_unchanged, snapshot
from sensitivity_lora import Allocation, export_hessians, load_hessians
from sensitivity_lora.calibration.checkpoint import BlockCheckpoint
from sensitivity_lora.calibration.streaming import iter_block_statistics
from sensitivity_lora.data import load_texts
from sensitivity_lora.errors import DataError, FileFormatError, MissingInputError, ModelError
from sensitivity_lora.scoring.result import load_initial_weights

pytestmark = pytest.mark.filterwarnings("ignore:sensitivity_lora._C is not built")


# ---------------------------------------------------------------- allocations

@pytest.fixture(scope="module")
def allocation():
    from sensitivity_lora import compute_allocation

    return compute_allocation(tiny_llama(), random_batches(2), avg_rank=4, progress=False)


def _first(data):
    return next(iter(data["modules"].values()))


def _edit(key, value):
    def edit(data):
        _first(data)[key] = value
    return edit


@pytest.mark.parametrize("edit, match", [
    (_edit("rank", -4), "rank=-4 is not a non-negative integer"),
    (_edit("rank", 3.5), "rank=3.5 is not a non-negative integer"),
    (_edit("rank", True), "rank=True is not a non-negative integer"),
    (_edit("rank", 10 ** 9), "rank 1000000000 exceeds the size"),
    (_edit("rank", "4"), "rank='4' is not a non-negative integer"),
    (_edit("theta", "nan"), "theta='nan' is not a finite number"),
    (_edit("trace", None), "trace=None is not a finite number"),
    (_edit("d_in", 0), "d_in=0 is not a positive integer"),
    (_edit("at_bound", "middle"), "at_bound='middle'"),
    (lambda d: d.update(method="best"), "method='best'"),
    (lambda d: d.update(avg_rank=-1), "avg_rank=-1"),
    (lambda d: d.update(modules={}), "modules is not a non-empty JSON object"),
    (lambda d: d.pop("budget"), "it has no budget"),
    (lambda d: _first(d).pop("group"), "has no group"),
])
def test_invalid_allocation_file_is_refused_naming_it(tmp_path, allocation, edit, match):
    data = allocation.to_dict()
    edit(data)
    path = tmp_path / "allocation.json"
    path.write_text(json.dumps(data))
    with pytest.raises(FileFormatError, match=match) as info:
        Allocation.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text, match", [
    ('{"method": "sra", "modules": {"m": {"theta": NaN}}}', "NaN is not a JSON number"),
    ('{"method": "sra", "avg_rank": Infinity}', "Infinity is not a JSON number"),
    ("[1, 2, 3]", "not a JSON object"),
    ("", "not a readable allocation"),
])
def test_non_json_or_non_finite_allocation_is_refused(tmp_path, text, match):
    path = tmp_path / "a.json"
    path.write_text(text)
    with pytest.raises(FileFormatError, match=match):
        Allocation.load(path)


def test_truncated_allocation_names_the_file(tmp_path, allocation):
    path = tmp_path / "allocation.json"
    allocation.save(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FileFormatError, match="may be truncated") as info:
        Allocation.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_allocation_path_that_is_no_file(tmp_path, kind):
    path = tmp_path / "nope.json"
    if kind == "folder":
        path.mkdir()
    with pytest.raises(MissingInputError, match="no allocation file" + (".*it is a folder" if kind == "folder" else "")):
        Allocation.load(path)


def test_truncated_initial_weights_name_the_file(tmp_path):
    from sensitivity_lora import compute_allocation

    alloc = compute_allocation(tiny_llama(), random_batches(2), avg_rank=4, init="covariance", progress=False)
    path = tmp_path / "w.safetensors"
    alloc.save_initial_weights(path)
    raw = path.read_bytes()
    path.write_bytes(raw[:100])
    with pytest.raises(FileFormatError, match="not a readable initial-weights file") as info:
        load_initial_weights(path, alloc)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- Hessian exports

@pytest.fixture(scope="module")
def export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    export_hessians(tiny_llama(), random_batches(2), out, progress=False)
    return out


@pytest.fixture
def copy(export, tmp_path):
    import shutil

    target = tmp_path / "export"
    shutil.copytree(export, target)
    return target


def _index(folder):
    return json.loads((folder / "index.json").read_text())


def _write_index(folder, index):
    (folder / "index.json").write_text(json.dumps(index))


def _a_group(folder):
    index = _index(folder)
    group, name = next(iter(index["groups"].items()))
    return index, group, folder / name


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/dir.safetensors", ".hidden.safetensors",
                                  "index.json", 42])
def test_index_names_outside_the_folder_are_refused(copy, tmp_path, name):
    (tmp_path / "outside.safetensors").write_bytes((copy / _a_group(copy)[2].name).read_bytes())
    index, group, _ = _a_group(copy)
    index["groups"][group] = name
    _write_index(copy, index)
    with pytest.raises(FileFormatError, match="plain '<group>.safetensors' names inside its folder"):
        load_hessians(copy)


def test_a_link_leading_outside_the_folder_is_refused(copy, tmp_path):
    index, group, path = _a_group(copy)
    outside = tmp_path / "elsewhere.safetensors"
    path.rename(outside)
    path.symlink_to(outside)
    with pytest.raises(FileFormatError, match="leads outside"):
        load_hessians(copy)


def _rewrite(path, change):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    change(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("change, match", [
    (lambda t, m: t.update(sumsq=t["sumsq"][:-1].clone()), r"sumsq has shape \(\d+,\), expected"),
    (lambda t, m: t.update(xtx=t["xtx"].float()), "xtx has dtype torch.float32"),
    (lambda t, m: t["sumsq"].__setitem__(0, math.nan), "sumsq holds NaN or infinite values"),
    (lambda t, m: t["sumsq"].__setitem__(0, -1.0), "Σx² has negative entries"),
    (lambda t, m: t["xtx"].__setitem__((0, 0), -5.0), "Σxxᵀ has negative diagonal"),
    (lambda t, m: t["xtx"].__setitem__((0, 1), 123.0), "not symmetric"),
    (lambda t, m: t.pop("xtx"), "'xtx' is missing"),
    (lambda t, m: m.update(n_tokens="many"), "n_tokens='many' is not an integer"),
    (lambda t, m: m.update(n_tokens="0"), "must be positive integers"),
    (lambda t, m: m.update(members="[not json"), "'members' is missing or not JSON"),
    (lambda t, m: m.update(format="other-tool"), "not a sensitivity-lora Hessian file"),
])
def test_tampered_hessian_file_is_refused_naming_it(copy, change, match):
    _, _, path = _a_group(copy)
    _rewrite(path, change)
    with pytest.raises(FileFormatError, match=match) as info:
        load_hessians(copy)
    assert str(path) in str(info.value)


def test_truncated_hessian_file_names_it(copy):
    _, _, path = _a_group(copy)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(FileFormatError, match="not a readable Hessian file.*truncated") as info:
        load_hessians(copy)
    assert str(path) in str(info.value)


def test_swapped_hessian_files_are_refused(copy):
    index = _index(copy)
    (g1, n1), (g2, n2) = list(index["groups"].items())[:2]
    index["groups"][g1], index["groups"][g2] = n2, n1
    _write_index(copy, index)
    with pytest.raises(FileFormatError, match="lists it as"):
        load_hessians(copy)


@pytest.mark.parametrize("write, match", [
    (lambda f: (f / "index.json").write_text("{truncated"), "not readable JSON"),
    (lambda f: (f / "index.json").write_text("[]"), "not the index of a sensitivity-lora Hessian export"),
    (lambda f: _write_index(f, {**_index(f), "modules": {"m": "no-such-group"}}), "which it does not list"),
    (lambda f: _write_index(f, {**_index(f), "complete": False}), "incomplete"),
    (lambda f: (f / _a_group(f)[2].name).unlink(), "no Hessian file at"),
])
def test_broken_export_folder_is_refused(copy, write, match):
    write(copy)
    with pytest.raises(FileFormatError, match=match):
        load_hessians(copy)


# ---------------------------------------------------------------- streaming checkpoints

@pytest.fixture
def checkpoint(tmp_path):
    model, batches = tiny_llama(), random_batches(2)
    folder = tmp_path / "ckpt"
    list(iter_block_statistics(model, batches, progress=False, checkpoint=BlockCheckpoint(folder)))
    return model, batches, folder


@pytest.mark.parametrize("damage, error, match", [
    (lambda f: (f / "manifest.json").write_text("{half"), FileFormatError, "not a readable checkpoint manifest"),
    (lambda f: (f / "manifest.json").write_text(json.dumps({"fingerprint": {}, "done": ["zero"]})),
     FileFormatError, "not a checkpoint manifest of this package"),
    (lambda f: (f / "block_00000.safetensors").write_bytes(b"\x10\x00"), FileFormatError,
     "not a readable checkpoint block"),
    (lambda f: _rewrite(f / "block_00000.safetensors", lambda t, m: t["g0.sumsq"].__setitem__(0, math.inf)),
     FileFormatError, "g0.sumsq|sumsq holds NaN or infinite"),
])
def test_damaged_checkpoint_is_refused_naming_the_file(checkpoint, damage, error, match):
    model, batches, folder = checkpoint
    damage(folder)
    before = snapshot(model)
    with pytest.raises(error, match=match) as info:
        list(iter_block_statistics(model, batches, progress=False, checkpoint=BlockCheckpoint(folder)))
    assert str(folder) in str(info.value)
    assert_unchanged(before, model)


# ---------------------------------------------------------------- calibration text files

@pytest.mark.parametrize("name, data, match", [
    ("utf16.txt", "héllo wörld\nsecond line\n".encode("utf-16"), "is UTF-16 text"),
    ("utf16be.txt", b"\xfe\xff" + "hello\n".encode("utf-16-be"), "is UTF-16 text"),
    ("utf32.txt", "hello\n".encode("utf-32"), "is UTF-32 text"),
    ("nobom.txt", "hello world\n".encode("utf-16-le"), "NUL bytes"),
    ("random.txt", bytes(range(1, 32)) * 40 + bytes(range(160, 256)), "does not look like text"),
    ("undecodable.txt", bytes(range(128, 256)), "neither UTF-8 nor Windows-1252"),
    ("rows.jsonl", ('{"text": "a"}\n').encode("utf-16"), "is UTF-16 text"),
])
def test_files_that_are_not_text_are_refused_naming_them(tmp_path, name, data, match):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError, match=match) as info:
        load_texts(path)
    assert str(path) in str(info.value)


def test_a_binary_file_in_a_text_folder_is_named(tmp_path):
    (tmp_path / "a.txt").write_text("fine text")
    (tmp_path / "b.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00" * 10)
    with pytest.raises(DataError, match="b.txt"):
        load_texts(tmp_path)


def test_a_utf8_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbffirst\nsecond\n")
    assert sorted(load_texts(path, shuffle_seed=None)) == ["first", "second"]


# ---------------------------------------------------------------- model folders

@pytest.mark.parametrize("damage, match", [
    (lambda f: (f / "model.safetensors").unlink(), "cannot load the weights"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
     "cannot load the weights.*truncated"),
    (lambda f: save_file({k: v for k, v in load_file(str(f / "model.safetensors")).items()
                          if "layers.1.mlp" not in k}, str(f / "model.safetensors"), metadata={"format": "pt"}),
     "weights are missing.*at random"),
])
def test_model_folder_with_bad_weights_is_refused(tiny_llama_dir, damage, match):
    from sensitivity_lora.models import load_model_and_tokenizer

    damage(tiny_llama_dir)
    with pytest.raises(ModelError, match=match) as info:
        load_model_and_tokenizer(tiny_llama_dir)
    assert str(tiny_llama_dir) in str(info.value)


def test_a_non_float_dtype_is_refused(tiny_llama_dir):
    from sensitivity_lora.models import load_model_and_tokenizer

    with pytest.raises(ValueError, match="floating torch dtype"):
        load_model_and_tokenizer(tiny_llama_dir, dtype=torch.int8)
