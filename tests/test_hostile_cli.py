"""The command under hostile use: every expected error is one line on stderr with its documented exit code
(--debug adds the traceback), a failed or killed run leaves the old outputs untouched (or the new set
complete), and the same run gives the same bytes whatever the hash seed."""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model_snapshot import folder_bytes, hidden_entries
from sensitivity_lora import cli
from sensitivity_lora.cli import main
from sensitivity_lora.folders import LOCK_FILE, output_lock, pending_commit, recover

pytestmark = pytest.mark.filterwarnings("ignore:sensitivity_lora._C is not built")

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [f"Sample {i} is about markets, music, elections and football, in that order." * (1 + i % 3)
         for i in range(12)]
OUTPUTS = {"allocation.json", "adapter_config.json", "initial_weights.safetensors", "ranks.png"}  # the default set


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny Llama with a real tokenizer, a text file and an old set of outputs (r̄ = 2)."""
    from conftest import save_tiny_llama

    root = tmp_path_factory.mktemp("cli")
    save_tiny_llama(root / "model")
    (root / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    assert main(args(root, root / "old", "--avg-rank", "2")) == 0
    return root


def args(root, out, *extra):
    return ["allocate", "--model", str(root / "model"), "--data", str(root / "texts.txt"), "--out", str(out),
            "--avg-rank", "4", "--max-samples", "12", "--seq-len", "32", "--batch-size", "4", "--quiet", *extra]


@pytest.fixture
def old(workspace, tmp_path):
    """A copy of the old set of outputs, in a folder of its own."""
    out = tmp_path / "out"
    shutil.copytree(workspace / "old", out)
    return out


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    ours = [line for line in err.splitlines() if line.startswith("sensitivity-lora")]
    assert len(ours) == 1, err
    return ours[0]


# ---------------------------------------------------------------- exit codes, one line each

@pytest.mark.parametrize("extra, message", [
    (["--avg-rank", "nan"], "--avg-rank: must be a positive finite number, got nan"),
    (["--avg-rank", "four"], "--avg-rank: 'four' is not a number"),
    (["--lora-alpha", "nan"], "--lora-alpha: must be a positive finite number"),
    (["--lora-alpha", "-16"], "--lora-alpha: must be a positive finite number"),
    (["--seq-len", "0"], "--seq-len: must be at least 1"),
    (["--max-samples", "-1"], "--max-samples: must be at least 1"),
    (["--batch-size", "2.5"], "--batch-size: '2.5' is not a whole number"),
    (["--energy", "inf"], "--energy: must be a finite number"),
    (["--rho", "nan"], "--rho: must be positive"),
    (["--seq-len", "200"], "--seq-len 200 is longer than the model takes (128 positions"),
    (["--target-modules", "nonexistent"], "no linear layer matches"),
    (["--energy", "1.5"], "energy=1.5 must lie in (0, 1]"),
])
def test_bad_options_exit_2_with_one_line(workspace, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(args(workspace, out, *extra)) == cli.EXIT_INPUT
    assert message in error_line(capsys)
    assert folder_bytes(out) == {}


def test_bad_options_fail_before_the_model_is_loaded(workspace, tmp_path, monkeypatch, capsys):
    import sensitivity_lora.models as models

    monkeypatch.setattr(models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(args(workspace, tmp_path / "o", "--energy", "2")) == cli.EXIT_INPUT
    assert "energy" in error_line(capsys)


def _no_weights(root, tmp_path):
    shutil.copytree(root / "model", tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    return tmp_path / "m"


def _truncated(root, tmp_path):
    shutil.copytree(root / "model", tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:4000])
    return tmp_path / "m"


@pytest.mark.parametrize("make, message", [
    (lambda root, tmp: tmp / "nowhere", "does not exist"),
    (_no_weights, "cannot load the weights"),
    (_truncated, "cannot load the weights"),
])
def test_bad_model_folder_exits_2(workspace, tmp_path, capsys, make, message):
    model = make(workspace, tmp_path)
    argv = args(workspace, tmp_path / "out")
    argv[argv.index("--model") + 1] = str(model)
    assert main(argv) == cli.EXIT_INPUT
    assert message in error_line(capsys)


def test_utf16_data_exits_2_naming_the_file(workspace, tmp_path, capsys):
    data = tmp_path / "utf16.txt"
    data.write_bytes("\n".join(TEXTS).encode("utf-16"))
    argv = args(workspace, tmp_path / "out")
    argv[argv.index("--data") + 1] = str(data)
    assert main(argv) == cli.EXIT_INPUT
    assert f"{data} is UTF-16 text" in error_line(capsys)


@pytest.mark.parametrize("make_out, message", [
    (lambda tmp: (tmp / "file").write_text("x") and tmp / "file", "is a file, not a folder"),
    (lambda tmp: (tmp / "file").write_text("x") and tmp / "file" / "out", "a parent of it is a file"),
])
def test_unusable_output_folder_exits_4(workspace, tmp_path, capsys, make_out, message):
    assert main(args(workspace, make_out(tmp_path))) == cli.EXIT_IO
    assert message in error_line(capsys)
    assert (tmp_path / "file").read_text() == "x"


def test_an_unwritable_output_folder_exits_4(workspace, tmp_path, monkeypatch, capsys):
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path).endswith("out") else real(path, mode))
    assert main(args(workspace, tmp_path / "out")) == cli.EXIT_IO
    assert "is not writable" in error_line(capsys)


def test_a_checkpoint_folder_that_is_a_file_exits_4_before_loading(workspace, tmp_path, monkeypatch, capsys):
    import sensitivity_lora.models as models

    (tmp_path / "ckpt").write_text("x")
    monkeypatch.setattr(models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(args(workspace, tmp_path / "out", "--checkpoint-dir", str(tmp_path / "ckpt"))) == cli.EXIT_IO
    assert "checkpoint folder" in error_line(capsys)


def test_a_folder_in_use_exits_5_and_is_untouched(workspace, old, capsys):
    import fcntl

    files = folder_bytes(old)
    with open(old / LOCK_FILE, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(args(workspace, old)) == cli.EXIT_CONFLICT
    assert "in use by another sensitivity-lora run" in error_line(capsys)
    assert folder_bytes(old) == files


def test_hessians_into_a_used_folder_exits_5(workspace, tmp_path, capsys):
    base = ["hessians", "--model", str(workspace / "model"), "--data", str(workspace / "texts.txt"),
            "--max-samples", "4", "--seq-len", "16", "--quiet", "--out", str(tmp_path / "h")]
    assert main(base) == 0
    files = folder_bytes(tmp_path / "h")
    capsys.readouterr()
    assert main(base) == cli.EXIT_CONFLICT
    assert "already holds a Hessian export" in error_line(capsys)
    assert main(base[:-2] + ["--seq-len", "12", "--out", str(tmp_path / "h"), "--resume"]) == cli.EXIT_CONFLICT
    assert "was written by a different run: the calibration data" in error_line(capsys)
    assert folder_bytes(tmp_path / "h") == files
    assert main(base + ["--resume", "--overwrite"]) == cli.EXIT_INPUT
    assert "not allowed with argument" in error_line(capsys)
    assert main(base + ["--device", "gpu0"]) == cli.EXIT_INPUT
    assert "not a device torch knows" in error_line(capsys)


def _write_allocation(path, theta):
    data = {"method": "sra", "avg_rank": 2, "budget": 4, "budget_mode": "rank",
            "modules": {f"m{i}": {"rank": 2, "theta": t, "trace": 1.0, "topk": 1.0, "eff_rank": 1.0, "d_in": 8,
                                  "d_out": 8, "group": f"m{i}"} for i, t in enumerate(theta)}}
    path.write_text(json.dumps(data).replace('"NAN"', "NaN"))
    return path


@pytest.mark.parametrize("make, message", [
    (lambda tmp: (tmp,) * 2, "(it is a folder"),
    (lambda tmp: (_write_allocation(tmp / "a.json", [1.0, "NAN"]),) * 2, "NaN is not a JSON number"),
    (lambda tmp: (_write_allocation(tmp / "a.json", [1.0, 1.0]), _write_allocation(tmp / "b.json", [1.0, 2.0])),
     "Kendall's τ is undefined"),
    (lambda tmp: (_write_allocation(tmp / "a.json", [1.0, 2.0]), tmp / "missing.json"), "no allocation file at"),
])
def test_compare_on_bad_files_exits_2(tmp_path, capsys, make, message):
    a, b = make(tmp_path)
    assert main(["compare", str(a), str(b)]) == cli.EXIT_INPUT
    assert message in error_line(capsys)


def test_calibration_failure_exits_3(workspace, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(workspace / "model"))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.fill_(float("inf"))  # activations overflow
    shutil.copytree(workspace / "model", tmp_path / "m")
    model.save_pretrained(tmp_path / "m")
    argv = args(workspace, tmp_path / "out")
    argv[argv.index("--model") + 1] = str(tmp_path / "m")
    assert main(argv) == cli.EXIT_CALIBRATION
    assert "non-finite activations" in error_line(capsys)


def test_missing_package_exits_6(workspace, tmp_path, monkeypatch, capsys):
    from sensitivity_lora.cli import options
    from sensitivity_lora.errors import MissingPackageError

    def missing(*a, **k):
        raise MissingPackageError("datasets", "pip install datasets", "reading the saved dataset")

    monkeypatch.setattr(options, "load_model_and_batches", missing)
    assert main(args(workspace, tmp_path / "out")) == cli.EXIT_PACKAGE
    assert "pip install datasets" in error_line(capsys)


# ---------------------------------------------------------------- late failures leave the old set

def _fail_verify(monkeypatch):
    import sensitivity_lora.peft as integration
    from sensitivity_lora.errors import RankMismatchError

    def verify(*a, **k):
        raise RankMismatchError("the PEFT model does not match the allocation: forced")

    monkeypatch.setattr(integration, "verify_ranks", verify)


def _fail_plot(monkeypatch):
    import sensitivity_lora.report as report

    monkeypatch.setattr(report, "plot_ranks", lambda *a, **k: {}["no such key"])


def _disk_full(monkeypatch):
    import sensitivity_lora.folders as folders  # where FileSet looks the writer up

    real = folders.atomic_write_text

    def write(path, text):
        if str(path).endswith("adapter_config.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, text)

    monkeypatch.setattr(folders, "atomic_write_text", write)


def _interrupt(monkeypatch):
    import sensitivity_lora.api as api

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "compute_allocation", interrupted)


@pytest.mark.parametrize("break_it, code, message", [
    (_fail_verify, cli.EXIT_VERIFY, "does not match the allocation"),
    (_fail_plot, cli.EXIT_INTERNAL, "internal error: KeyError"),
    (_disk_full, cli.EXIT_IO, "No space left on device"),
    (_interrupt, cli.EXIT_INTERRUPTED, "interrupted"),
])
def test_a_late_failure_leaves_the_old_set_untouched(workspace, old, monkeypatch, capsys, break_it, code, message):
    files = folder_bytes(old)
    assert set(files) == OUTPUTS
    break_it(monkeypatch)
    assert main(args(workspace, old)) == code
    assert message in error_line(capsys)
    assert folder_bytes(old) == files  # byte for byte the old set
    assert hidden_entries(old) == []  # no staging folder, journal or lock left


def test_debug_shows_the_traceback(workspace, old, monkeypatch, capsys):
    _fail_plot(monkeypatch)
    assert main(["--debug"] + args(workspace, old)) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError" in err
    assert main(args(workspace, old, "--debug")) == cli.EXIT_INTERNAL  # after the sub-command too
    assert "Traceback" in capsys.readouterr().err


def test_a_new_set_replaces_the_whole_old_one(workspace, old):
    assert main(args(workspace, old, "--init", "covariance")) == 0
    assert set(folder_bytes(old)) == OUTPUTS | {"initial_weights.safetensors"}
    assert main(args(workspace, old, "--init", "none", "--no-plot")) == 0  # no init, no plot: the old ones must not stay
    files = folder_bytes(old)
    assert set(files) == {"allocation.json", "adapter_config.json"}
    allocation = json.loads(files["allocation.json"])
    config = json.loads(files["adapter_config.json"])
    assert {k.replace("\\", ""): v for k, v in config["rank_pattern"].items()} == \
        {n: m["rank"] for n, m in allocation["modules"].items()}
    assert config["target_modules"] == sorted(allocation["modules"])


def test_allocation_json_holds_no_timings(workspace, tmp_path):
    assert main(args(workspace, tmp_path / "a", "--no-plot", "--no-verify")) == 0
    assert main(args(workspace, tmp_path / "b", "--no-plot", "--no-verify")) == 0
    a = (tmp_path / "a" / "allocation.json").read_bytes()
    assert a == (tmp_path / "b" / "allocation.json").read_bytes()

    def keys(value):
        if isinstance(value, dict):
            for k, v in value.items():
                yield k
                yield from keys(v)

    timing = [k for k in keys(json.loads(a)) if any(w in k.lower() for w in ("time", "second", "duration", "wall"))]
    assert timing == []


# ---------------------------------------------------------------- subprocess runs: hash seeds and kills

def _run(root, out, hash_seed, **popen):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": str(hash_seed),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "sensitivity_lora.cli"] + args(root, out, "--init", "covariance")
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)


@pytest.fixture(scope="module")
def new_set(workspace):
    """The new set of outputs, from two runs under different hash seeds (and how long one takes)."""
    sets, seconds = [], []
    for seed in (1, 2):
        out = workspace / f"new-{seed}"
        start = time.perf_counter()
        proc = _run(workspace, out, seed)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-3000:]
        seconds.append(time.perf_counter() - start)
        sets.append(folder_bytes(out))
    return sets, min(seconds)


def test_the_same_run_gives_the_same_bytes_under_any_hash_seed(new_set):
    (first, second), _ = new_set
    assert set(first) == OUTPUTS | {"initial_weights.safetensors"}
    different = [name for name in first if first[name] != second.get(name)]
    assert different == [], f"{different} differ between PYTHONHASHSEED=1 and 2"


def test_a_run_killed_at_a_random_point_leaves_the_old_set_or_the_new_one(workspace, new_set, tmp_path):
    (new, _), seconds = new_set
    old = folder_bytes(workspace / "old")
    rng = random.Random()
    outcomes = []
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        shutil.copytree(workspace / "old", out)
        delay = rng.uniform(0.3 * seconds, 1.05 * seconds)  # imports take the first third of a run
        proc = _run(workspace, out, attempt)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if pending_commit(out):  # killed between the renames of the commit: the next run finishes it
            with output_lock(out):
                recover(out)
            outcomes.append("finished by the next run")
        state = folder_bytes(out)
        assert state in (old, new), f"after a kill at {delay:.2f} s the folder holds a mix: {sorted(state)}"
        outcomes.append("old" if state == old else "new")
        with output_lock(out):  # no stale lock: the next run can start
            recover(out)
        assert hidden_entries(out) == []
    print(f"kills after a {seconds:.1f} s run: {outcomes}")
