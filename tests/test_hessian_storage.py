"""Σxxᵀ storage options of the Hessian files (fp32, upper triangle), read back transparently; old files load."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_batches, tiny_llama
from sensitivity_lora.errors import FileFormatError
from sensitivity_lora.hessians import export_hessians, load_hessian, load_hessians

pytestmark = pytest.mark.filterwarnings("ignore:sensitivity_lora._C is not built")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    model, batches = tiny_llama(), random_batches(2, seed=5)
    out = {}
    for dtype in ("float64", "float32"):
        for layout in ("full", "upper"):
            path = tmp_path_factory.mktemp(f"h-{dtype}-{layout}")
            export_hessians(model, batches, path, storage_dtype=dtype, layout=layout, progress=False)
            out[dtype, layout] = path
    return out


def _bytes(path) -> int:
    """Bytes of the stored Σxxᵀ (the files of a tiny model are mostly metadata)."""
    return sum(t.nbytes for p in path.glob("*.safetensors") for k, t in load_file(p).items() if k.startswith("xtx"))


def test_every_storage_reads_back_as_the_full_fp64_matrix(exports):
    reference = load_hessians(exports["float64", "full"], by="group")
    for (dtype, layout), path in exports.items():
        loaded = load_hessians(path, by="group")
        assert set(loaded) == set(reference)
        for group, h in loaded.items():
            expected = reference[group].raw_xtx
            assert h.raw_xtx.dtype == torch.float64 and torch.equal(h.raw_xtx, h.raw_xtx.T)
            if dtype == "float64":
                assert torch.equal(h.raw_xtx, expected)  # lossless: the triangle holds every value
            else:
                torch.testing.assert_close(h.raw_xtx, expected, rtol=1e-7, atol=1e-7 * float(expected.abs().max()))
            assert torch.equal(h.raw_sumsq, reference[group].raw_sumsq)  # the vectors stay fp64
            assert (h.n_tokens, h.n_sequences, h.members) == (reference[group].n_tokens, reference[group].n_sequences,
                                                              reference[group].members)


def test_storage_shrinks_the_files_and_is_recorded(exports):
    sizes = {k: _bytes(p) for k, p in exports.items()}
    assert sizes["float32", "full"] == sizes["float64", "full"] // 2
    assert sizes["float64", "upper"] < 0.55 * sizes["float64", "full"]  # d(d+1)/2 of d² (d = 32, 48 here)
    assert sizes["float32", "upper"] < 0.28 * sizes["float64", "full"]
    index = json.loads((exports["float32", "upper"] / "index.json").read_text())
    assert (index["format_version"], index["xtx_dtype"], index["xtx_layout"]) == ("3", "float32", "upper")
    name = next(iter(index["groups"].values()))
    stored = load_file(exports["float32", "upper"] / name)
    assert "xtx" not in stored and stored["xtx_upper"].dtype == torch.float32 and stored["xtx_upper"].dim() == 1


def test_version_2_files_still_load(exports, tmp_path):
    from safetensors import safe_open

    src = exports["float64", "full"]
    for path in src.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata())
        for key in ("xtx_dtype", "xtx_layout"):
            meta.pop(key)
        meta["format_version"] = "2"
        save_file(load_file(path), tmp_path / path.name, metadata=meta)
        old, new = load_hessian(tmp_path / path.name), load_hessian(path)
        assert torch.equal(old.raw_xtx, new.raw_xtx) and old.members == new.members


def _rewrite(path, out, tensors=None, **meta_changes):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes)
    save_file(tensors if tensors is not None else load_file(path), out, metadata=meta)
    return out


def test_tampered_storage_is_refused_naming_the_file(exports, tmp_path):
    path = next(exports["float32", "upper"].glob("*.safetensors"))
    tensors = load_file(path)
    short = {**tensors, "xtx_upper": tensors["xtx_upper"][:-1].clone()}
    with pytest.raises(FileFormatError, match="xtx_upper has shape"):
        load_hessian(_rewrite(path, tmp_path / "a.safetensors", short))
    with pytest.raises(FileFormatError, match="metadata says float64"):
        load_hessian(_rewrite(path, tmp_path / "b.safetensors", xtx_dtype="float64"))
    with pytest.raises(FileFormatError, match="unknown Σxxᵀ storage"):
        load_hessian(_rewrite(path, tmp_path / "c.safetensors", xtx_layout="lower"))
    with pytest.raises(FileFormatError, match="format version '9'"):
        load_hessian(_rewrite(path, tmp_path / "d.safetensors", format_version="9"))
    with pytest.raises(FileFormatError, match="layout is 'full'"):
        load_hessian(_rewrite(path, tmp_path / "e.safetensors", xtx_layout="full"))


def test_bad_storage_options_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="storage dtype"):
        export_hessians(tiny_llama(), random_batches(1), tmp_path / "x", storage_dtype="float16")
    with pytest.raises(ValueError, match="storage layout"):
        export_hessians(tiny_llama(), random_batches(1), tmp_path / "x", layout="packed")
    assert not (tmp_path / "x").exists()


def test_the_command_writes_the_storage_it_is_asked_for(tiny_llama_dir, tmp_path):
    from sensitivity_lora.cli import main

    (tmp_path / "texts.txt").write_text("\n".join(f"text {i} about markets and music" for i in range(6)) + "\n")
    runs = {}
    for name, extra in (("default", []), ("small", ["--storage-dtype", "float32", "--layout", "upper"])):
        out = tmp_path / name
        assert main(["hessians", "--model", str(tiny_llama_dir), "--data", str(tmp_path / "texts.txt"), "--out",
                     str(out), "--max-samples", "6", "--seq-len", "16", "--batch-size", "3", "-q", *extra]) == 0
        runs[name] = out
    assert _bytes(runs["small"]) < _bytes(runs["default"]) / 3  # fp32 and about half the entries
    small, default = load_hessians(runs["small"], by="group"), load_hessians(runs["default"], by="group")
    assert small.keys() == default.keys()
    for group, h in default.items():
        assert small[group].raw_xtx.dtype == torch.float64
        torch.testing.assert_close(small[group].raw_xtx, h.raw_xtx, rtol=1e-6, atol=1e-6 * float(h.raw_xtx.abs().max()))
