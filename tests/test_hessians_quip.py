"""QuIP# Hessian export: files in quip-sharp's layout (hessian_offline_llama.py's accumulate(), data_utils'
sym_to_flat), read back by a reader written here from that description alone; the checked reader refuses
corrupt files; names; the folder is written whole."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import oracles
from conftest import random_batches, tiny_gpt2, tiny_llama
import sensitivity_lora
from sensitivity_lora.errors import FileFormatError, MissingInputError, OutputExistsError, TargetError
from sensitivity_lora.hessians import export_hessians, load_hessians, read_quip_hessian, write_quip_hessians
from sensitivity_lora.hessians.quip import quip_file_name
from sensitivity_lora.init.state import group_sums_from_statistics

pytestmark = pytest.mark.filterwarnings("ignore:sensitivity_lora._C is not built")

EXPECTED = {f"{i}_{k}.pt" for i in (0, 1) for k in ("qkv", "o", "up", "down")}
LEADERS = {"qkv": "self_attn.q_proj", "o": "self_attn.o_proj", "up": "mlp.gate_proj", "down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def statistics():
    torch.set_num_threads(1)
    model = tiny_llama()
    batches = random_batches(3, seed=5)  # padded rows: the package drops them, before and after the export
    return model, batches, sensitivity_lora.calibrate(model, batches, hessian="full", progress=False)


def independent_read(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """From the layout description only: flatH = lower triangle of the centred covariance, rows one after
    another (numpy's tril_indices order), fp32; mu fp32; n = d; ct = tokens. QuIP# uses C + μμᵀ."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    assert set(data) == {"flatH", "mu", "n", "ct"}
    assert type(data["n"]) is int and type(data["ct"]) is int
    assert data["flatH"].dtype == torch.float32 and data["mu"].dtype == torch.float32
    d = data["n"]
    flat = data["flatH"].numpy().astype(np.float64)
    mu = data["mu"].numpy().astype(np.float64)
    assert flat.shape == (d * (d + 1) // 2,) and mu.shape == (d,)
    cov = np.zeros((d, d))
    i, j = np.tril_indices(d)
    cov[i, j] = flat
    cov[j, i] = flat
    return cov + np.outer(mu, mu), cov, mu, d, data["ct"]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def captured_inputs(model, batches, names):
    """Each module's non-padding inputs in fp64 (numpy), captured plainly (an oracle independent of the package)."""
    return {n: x.numpy() for n, x in oracles.captured_inputs(model, batches, names).items()}


# ---------------------------------------------------------------- (a) values

@pytest.mark.parametrize("from_folder", [False, True], ids=["in-memory", "export-folder"])
def test_files_read_independently_equal_the_package_hessian(tmp_path, statistics, from_folder):
    model, batches, stats = statistics
    if from_folder:
        export_hessians(model, batches, tmp_path / "h", progress=False)
        source = tmp_path / "h"
    else:
        source = stats
    written = write_quip_hessians(source, tmp_path / "quip")
    assert set(written) == EXPECTED
    package = load_hessians(tmp_path / "h", convention="1/tokens") if from_folder else None
    oracle_x = captured_inputs(model, batches, [f"model.layers.{i}.{LEADERS[k]}" for i in (0, 1) for k in LEADERS])
    for name in EXPECTED:
        block, kind = name[:-3].split("_")
        leader = f"model.layers.{block}.{LEADERS[kind]}"
        group = stats.groups[leader]
        H, cov, mu, d, ct = independent_read(tmp_path / "quip" / name)
        assert d == group.d_in and ct == group.n_tokens
        # the quantity QuIP#'s quantize_linear works with: Σxxᵀ/ct in the package's own numbers
        expected = (package[leader].hessian if package else group.raw_xtx() / group.n_tokens).numpy()
        assert rel_err(H, expected) < 1e-6, name
        assert rel_err(mu, group.sum.numpy() / group.n_tokens) < 1e-6
        centred = expected - np.outer(group.sum.numpy(), group.sum.numpy()) / group.n_tokens ** 2
        assert rel_err(cov, centred) < 1e-6  # the stored part is centred
        assert rel_err(cov, expected) > 1e-3  # ... and the test tells centred from uncentred
        # the same against plainly captured inputs (fp64; the package's fp32 products: 2e-5)
        x = oracle_x[leader]
        assert x.shape[0] == ct
        assert rel_err(H, x.T @ x / ct) < 2e-5 and rel_err(mu, x.mean(0)) < 2e-5
        assert rel_err(cov, np.cov(x.T, bias=True)) < 2e-5
        # the packing order is QuIP#'s (tril, rows first), which numpy's triu order (rows first) is not
        data = torch.load(tmp_path / "quip" / name, weights_only=True)
        wrong = np.zeros((d, d))
        i, j = np.triu_indices(d)
        wrong[i, j] = data["flatH"].numpy()
        wrong[j, i] = data["flatH"].numpy()
        assert rel_err(wrong, cov) > 1e-2
        # the package's checked reader gives the same matrix
        checked = read_quip_hessian(tmp_path / "quip" / name)
        assert checked.n == ct and checked.H.dtype == torch.float64 and checked.H.shape == (d, d)
        assert rel_err(checked.H.numpy(), H) < 1e-12 and rel_err(checked.covariance.numpy(), cov) < 1e-9


def test_every_source_kind_gives_the_same_files(tmp_path, statistics):
    model, batches, stats = statistics
    export_hessians(model, batches, tmp_path / "h", progress=False)
    write_quip_hessians(stats, tmp_path / "a")
    write_quip_hessians(group_sums_from_statistics(stats), tmp_path / "b")
    write_quip_hessians(stats.groups, tmp_path / "c")
    write_quip_hessians(load_hessians(tmp_path / "h", by="module"), tmp_path / "d")  # one object per member
    for name in EXPECTED:
        a = torch.load(tmp_path / "a" / name, weights_only=True)
        for other in ("b", "c", "d"):
            b = torch.load(tmp_path / other / name, weights_only=True)
            assert torch.equal(a["flatH"], b["flatH"]) and torch.equal(a["mu"], b["mu"])
            assert (a["n"], a["ct"]) == (b["n"], b["ct"])


# ---------------------------------------------------------------- (b) the checked reader

def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


@pytest.fixture
def good(tmp_path, statistics):
    write_quip_hessians(statistics[2], tmp_path / "q")
    path = tmp_path / "q" / "0_qkv.pt"
    return path, torch.load(path, weights_only=True)


class Trap:
    """Unpickling this would create a file: the reader must refuse it without running it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def corruptions(data: dict, tmp_path: Path) -> dict[str, tuple[object, str]]:
    d = data["n"]
    flat_nan = data["flatH"].clone()
    flat_nan[3] = float("nan")
    mu_inf = data["mu"].clone()
    mu_inf[0] = float("inf")
    not_psd = data["flatH"].clone()
    not_psd[1] = 10 * float(data["flatH"][0].abs() + data["flatH"][2].abs()) + 1  # C[1,0] ≫ √(C00·C11)
    neg_diag = data["flatH"].clone()
    neg_diag[2] = -abs(float(neg_diag[2])) - 1  # C[1,1]
    return {
        "short": ({**data, "flatH": data["flatH"][:-1]}, "flatH"),
        "nan": ({**data, "flatH": flat_nan}, "non-finite"),
        "inf-mu": ({**data, "mu": mu_inf}, "non-finite"),
        "mu-length": ({**data, "mu": data["mu"][:-1]}, "'mu'"),
        "wrong-n": ({**data, "n": d + 1}, "flatH"),
        "list-not-tensor": ({**data, "flatH": data["flatH"].tolist()}, "must be a tensor"),
        "int-tensor": ({**data, "flatH": data["flatH"].round().to(torch.int64)}, "floating-point"),
        "2d": ({**data, "mu": data["mu"][None]}, "'mu'"),
        "missing-mu": ({k: v for k, v in data.items() if k != "mu"}, "lacks the key(s) 'mu'"),
        "missing-ct": ({k: v for k, v in data.items() if k != "ct"}, "'ct'"),
        "zero-count": ({**data, "ct": 0}, "positive"),
        "float-n": ({**data, "n": float(d)}, "integer"),
        "bool-ct": ({**data, "ct": True}, "integer"),
        "not-a-dict": ([data["flatH"], data["mu"]], "not the dict"),
        "not-psd": ({**data, "flatH": not_psd}, "not positive semidefinite"),
        "negative-diagonal": ({**data, "flatH": neg_diag}, "negative diagonal"),
        "pickled-object": ({**data, "flatH": Trap(tmp_path / "trap-ran")}, "weights_only"),
    }


def test_reader_accepts_the_written_file(good):
    path, data = good
    H, mu, n = read_quip_hessian(path)
    assert n == data["ct"] and mu.shape == (data["n"],) and torch.equal(H, H.T)


@pytest.mark.parametrize("case", ["short", "nan", "inf-mu", "mu-length", "wrong-n", "list-not-tensor", "int-tensor",
                                  "2d", "missing-mu", "missing-ct", "zero-count", "float-n", "bool-ct", "not-a-dict",
                                  "not-psd", "negative-diagonal", "pickled-object"])
def test_reader_refuses_a_corrupt_file(tmp_path, good, case):
    _, data = good
    obj, words = corruptions(data, tmp_path)[case]
    path = _save(tmp_path / f"{case}.pt", obj)
    with pytest.raises(FileFormatError) as info:
        read_quip_hessian(path)
    message = str(info.value)
    assert str(path) in message and words in message, message
    assert not (tmp_path / "trap-ran").exists()  # nothing in the file was executed


def test_reader_refuses_truncated_and_missing_files(tmp_path, good):
    path, _ = good
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FileFormatError, match="not a readable torch file") as info:
        read_quip_hessian(cut)
    assert str(cut) in str(info.value)
    with pytest.raises(MissingInputError, match="no QuIP# Hessian file"):
        read_quip_hessian(tmp_path / "absent.pt")


# ---------------------------------------------------------------- (c) names

def test_names_of_a_two_block_llama(tmp_path, statistics):
    _, _, stats = statistics
    written = write_quip_hessians(stats, tmp_path / "q")
    assert {p.name for p in (tmp_path / "q").iterdir()} == EXPECTED  # nothing else: no lock, staging, temporaries
    assert written["0_qkv.pt"] == tuple(f"model.layers.0.self_attn.{m}_proj" for m in "qkv")
    assert written["1_up.pt"] == ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj")
    assert written["1_o.pt"] == ("model.layers.1.self_attn.o_proj",) and written["0_down.pt"] == (
        "model.layers.0.mlp.down_proj",)
    for i in (0, 1):  # q/k/v (and gate/up) read one input; o and down each their own
        sizes = {k: torch.load(tmp_path / "q" / f"{i}_{k}.pt", weights_only=True)["n"] for k in LEADERS}
        assert sizes == {"qkv": 32, "o": 32, "up": 32, "down": 48}


def test_module_names_map_to_quip_files():
    assert quip_file_name("model.layers.0.self_attn.k_proj") == "0_qkv.pt"
    assert quip_file_name("model.layers.12.mlp.gate_proj") == "12_up.pt"
    assert quip_file_name("base_model.model.model.layers.3.mlp.up_proj.base_layer") == "3_up.pt"
    assert quip_file_name("model.layers.7.mlp.down_proj") == "7_down.pt"
    for bad in ("lm_head", "transformer.h.0.attn.c_attn", "model.layers.0.mlp.gate_proj.lora_A",
                "model.layers.0.self_attn.q_norm"):
        with pytest.raises(TargetError, match="no QuIP# Hessian name"):
            quip_file_name(bad)


def test_partial_and_foreign_models_are_refused_unless_asked(tmp_path, statistics):
    model, batches, _ = statistics
    partial = sensitivity_lora.calibrate(model, batches, target_modules=["q_proj", "down_proj"], hessian="full",
                                         progress=False)
    with pytest.raises(TargetError, match="1_up.pt|0_o.pt"):
        write_quip_hessians(partial, tmp_path / "p")
    assert not (tmp_path / "p").exists()
    assert set(write_quip_hessians(partial, tmp_path / "p", strict=False)) == {"0_qkv.pt", "0_down.pt", "1_qkv.pt",
                                                                               "1_down.pt"}
    gpt2 = sensitivity_lora.calibrate(tiny_gpt2(), random_batches(1), hessian="full", progress=False)
    with pytest.raises(TargetError, match="no QuIP# Hessian name"):
        write_quip_hessians(gpt2, tmp_path / "g")
    diag = sensitivity_lora.calibrate(model, batches[:1], hessian="diag", progress=False)
    with pytest.raises(ValueError, match="hessian='full'"):
        write_quip_hessians(diag, tmp_path / "d")
    assert not (tmp_path / "g").exists() and not (tmp_path / "d").exists()


# ---------------------------------------------------------------- (d) whole-folder writes

def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def poisoned(stats, leader: str):
    """GroupSums of ``stats`` with a NaN in one group's Σx: that file fails after the ones before it are staged."""
    sums = group_sums_from_statistics(stats)
    bad = sums[leader].total.clone()
    bad[0] = float("nan")
    sums[leader] = sums[leader]._replace(total=bad)
    return sums


def test_existing_folder_is_refused_or_replaced_whole(tmp_path, statistics):
    model, batches, stats = statistics
    out = tmp_path / "q"
    write_quip_hessians(stats, out)
    (out / "5_qkv.pt").write_bytes((out / "0_qkv.pt").read_bytes())  # a file of a bigger, older set
    (out / "dev_activations.pt").write_bytes(b"QuIP#'s own cache")  # not ours
    before = snapshot(out)
    with pytest.raises(OutputExistsError, match="overwrite"):
        write_quip_hessians(stats, out)
    assert snapshot(out) == before
    # a failure half way (the 6th file of 8): nothing changes, nothing is left behind
    with pytest.raises(ValueError, match="1_up.pt") as info:
        write_quip_hessians(poisoned(stats, "model.layers.1.mlp.gate_proj"), out, overwrite=True)
    assert "not finite" in str(info.value)
    assert snapshot(out) == before
    # a failing disk (torch.save raising on the 3rd file)
    real_save, calls = torch.save, []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 3:
            Path(f).write_bytes(b"half a file")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    other = sensitivity_lora.calibrate(model, random_batches(2, seed=9), hessian="full", progress=False)
    torch.save = failing_save
    try:
        with pytest.raises(OSError, match="No space left"):
            write_quip_hessians(other, out, overwrite=True)
    finally:
        torch.save = real_save
    assert len(calls) == 3 and snapshot(out) == before
    # overwrite replaces the whole set: the older set's extra file goes, other files stay
    write_quip_hessians(other, out, overwrite=True)
    after = snapshot(out)
    assert set(after) == EXPECTED | {"dev_activations.pt"}
    assert after["dev_activations.pt"] == before["dev_activations.pt"]
    assert after["0_qkv.pt"] != before["0_qkv.pt"]
    assert read_quip_hessian(out / "0_qkv.pt").n == other.groups["model.layers.0.self_attn.q_proj"].n_tokens


def test_a_failed_write_into_a_new_folder_leaves_no_folder(tmp_path, statistics):
    out = tmp_path / "new" / "q"
    with pytest.raises(ValueError, match="0_down.pt"):
        write_quip_hessians(poisoned(statistics[2], "model.layers.0.mlp.down_proj"), out)
    assert not out.exists()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_an_incomplete_export_folder_is_refused(tmp_path, statistics):
    model, batches, _ = statistics
    export_hessians(model, batches[:1], tmp_path / "h", progress=False)
    index = tmp_path / "h" / "index.json"
    index.write_text(index.read_text().replace('"complete": true', '"complete": false'))
    with pytest.raises(FileFormatError, match="incomplete"):
        write_quip_hessians(tmp_path / "h", tmp_path / "q")
    assert not (tmp_path / "q").exists()
    assert os.listdir(tmp_path) == ["h"]
