"""The command behaves like the tools around it: --version, --json, -q/-v through logging, defaults in
every --help, no carriage returns off a terminal, a warning when a launcher left one process."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sensitivity_lora
from sensitivity_lora import cli, progress
from sensitivity_lora.calibration.distributed import LAUNCHER_VARS, single_process_warning
from sensitivity_lora.cli import main
from sensitivity_lora.cli.options import HelpFormatter

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [f"Sample {i} is about markets, music, elections and football, one after the other." * (1 + i % 3)
         for i in range(12)]
SUMMARY_KEYS = {"method", "avg_rank", "budget", "budget_mode", "rank_sum", "trainable_params", "n_modules",
                "ranks", "init", "verified", "settings", "outputs", "seconds"}


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def allocate_args(model_dir, data, out, *extra) -> list[str]:
    return ["allocate", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--avg-rank", "4",
            "--max-samples", "12", "--seq-len", "32", "--batch-size", "4", "--no-plot", *extra]


def hessians_args(model_dir, data, out, *extra) -> list[str]:
    return ["hessians", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--max-samples", "4",
            "--seq-len", "16", "--hessian", "diag", *extra]


def test_version_names_the_package_torch_and_the_extension(capsys):
    import torch

    assert main(["--version"]) == cli.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"sensitivity-lora (\S+)", lines[0]).group(1) == sensitivity_lora.__version__
    assert lines[1].startswith(f"torch {torch.__version__} (")
    assert re.fullmatch(r"sensitivity_lora\._C: (loaded|not loaded \(.+\))", lines[2])


def test_allocate_json_is_the_only_thing_on_stdout(tiny_llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(allocate_args(tiny_llama_dir, text_file, out, "--json")) == cli.EXIT_OK
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # the whole of stdout: one object, no rank table, no messages
    assert SUMMARY_KEYS <= set(summary)
    on_disk = json.loads((out / "allocation.json").read_text())
    assert summary["ranks"] == {name: m["rank"] for name, m in on_disk["modules"].items()}
    assert summary["rank_sum"] == sum(summary["ranks"].values()) == summary["budget"] == 4 * summary["n_modules"]
    assert summary["avg_rank"] == 4 and summary["init"] == "covariance" and summary["verified"] is True  # the default
    assert summary["settings"]["n_samples"] == 12 and summary["settings"]["hessian"] == "full"
    assert sorted(summary["outputs"]) == sorted(str(out / n) for n in ("allocation.json", "adapter_config.json",
                                                                       "initial_weights.safetensors"))
    assert "wrote" in captured.err  # the human-readable lines went to stderr


def test_quiet_leaves_stderr_free_of_bars_and_messages(tiny_llama_dir, text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "draws_bars", lambda: True)  # as if stderr were a terminal
    assert main(allocate_args(tiny_llama_dir, text_file, tmp_path / "a", "--no-verify")) == cli.EXIT_OK
    assert "\r" in capsys.readouterr().err  # the bar a terminal gets
    assert main(["-q"] + allocate_args(tiny_llama_dir, text_file, tmp_path / "b", "--no-verify")) == cli.EXIT_OK
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.strip()  # the rank table still comes
    logger = logging.getLogger("sensitivity_lora")
    assert logger.propagate and not logger.handlers  # main put the logging state back


def test_stderr_in_a_file_gets_lines_not_carriage_returns(tiny_llama_dir, text_file, tmp_path):
    """``python -m sensitivity_lora`` in a subprocess, stderr into a file, as under nohup or CI."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "stderr.log"
    with log.open("wb") as err:
        done = subprocess.run([sys.executable, "-m", "sensitivity_lora"]
                              + allocate_args(tiny_llama_dir, text_file, tmp_path / "out", "--json"),
                              env=env, stdout=subprocess.PIPE, stderr=err, timeout=600)
    raw = log.read_bytes()  # not read_text: universal newlines would turn a "\r" into "\n"
    text = raw.decode()
    assert done.returncode == 0, text[-3000:]
    assert b"\r" not in raw  # neither our bars nor transformers' ("Loading weights")
    assert re.search(r"^calibrating: batch 0/3$", text, flags=re.M)  # start, progress and end as lines
    assert re.search(r"^calibrating: batch 3/3 done in [\d.]+ s$", text, flags=re.M)
    assert json.loads(done.stdout)["rank_sum"] > 0


def test_progress_lines_for_an_iterable_without_length(caplog):
    caplog.set_level(logging.INFO, "sensitivity_lora.progress")
    assert list(progress.progress_bar((i for i in range(25)), True, "reading", "text")) == list(range(25))
    assert [r.getMessage().split(" (")[0] for r in caplog.records][:3] == ["reading: text 0", "reading: text 10",
                                                                           "reading: text 20"]
    assert caplog.records[-1].getMessage().startswith("reading: text 25 done in")


def every_option() -> list[tuple[argparse.ArgumentParser, argparse.Action]]:
    found = []
    for parser in cli.parsers(cli.build_parser()):
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction, cli._Version)):
                found.append((parser, action))
    return found


def test_every_option_has_a_help_and_shows_its_default():
    options = every_option()
    commands = {parser.prog for parser, _ in options}
    assert {"sensitivity-lora allocate", "sensitivity-lora hessians", "sensitivity-lora evaluate classify",
            "sensitivity-lora evaluate stability"} <= commands
    missing = []
    for parser, action in options:
        assert parser.formatter_class is HelpFormatter, parser.prog
        text = HelpFormatter(parser.prog)._get_help_string(action)
        needs_default = bool(action.option_strings) and not action.required
        if not action.help or (needs_default and ("default:" not in text or "default: None" in text)):
            missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}: {text!r}")
    assert missing == []


def test_help_shows_the_defaults(capsys):
    assert main(["evaluate", "classify", "--help"]) == cli.EXIT_OK
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0 1 2)" in text and "--quiet" in text


def test_the_flags_work_before_and_after_the_sub_command(capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["-q", "compare", "a", "b"]).quiet
    assert parser.parse_args(["compare", "a", "b", "-v"]).verbose
    assert parser.parse_args(["evaluate", "methods", "--quiet"]).quiet
    assert main(["-q", "compare", "a", "b", "-v"]) == cli.EXIT_INPUT
    assert "contradict" in capsys.readouterr().err


def test_single_process_warning_reads_the_launcher_variables():
    assert single_process_warning({}) is None
    assert single_process_warning({"WORLD_SIZE": "1"}) is None  # no launcher: a plain run
    assert single_process_warning({"LOCAL_RANK": "0", "WORLD_SIZE": "2"}) is None
    for env in ({"LOCAL_RANK": "0", "WORLD_SIZE": "1"}, {"TORCHELASTIC_RUN_ID": "x"}, {"ACCELERATE_USE_CPU": "True"}):
        warning = single_process_warning(env)
        assert "only one process" in warning and "torchrun --nproc_per_node N -m sensitivity_lora" in warning
        assert "accelerate launch --multi_gpu --num_processes N" in warning
    # what `accelerate launch --cpu --num_processes 2` leaves (accelerate 1.15: one process, no WORLD_SIZE)
    assert single_process_warning({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}).startswith(
        "accelerate launch started this process (ACCELERATE_USE_CPU is set) but WORLD_SIZE is not set")


@pytest.mark.parametrize("launched", [True, False])
def test_hessians_warns_when_a_launcher_left_one_process(tiny_llama_dir, text_file, tmp_path, capsys, monkeypatch,
                                                         launched):
    for var in [*LAUNCHER_VARS, "WORLD_SIZE", *(v for v in os.environ if v.startswith("ACCELERATE_"))]:
        monkeypatch.delenv(var, raising=False)
    if launched:
        monkeypatch.setenv("LOCAL_RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(hessians_args(tiny_llama_dir, text_file, tmp_path / "h", "-v")) == cli.EXIT_OK
    err = capsys.readouterr().err
    assert ("sensitivity-lora: warning: torchrun started this process (LOCAL_RANK is set) but WORLD_SIZE is 1: "
            "only one process runs" in err) is launched
    assert "wrote the Hessians of 4 samples" in err


def test_exit_codes_of_a_usage_and_a_runtime_error(tiny_llama_dir, text_file, tmp_path, capsys):
    assert main(allocate_args(tiny_llama_dir, text_file, tmp_path / "o", "--avg-rank", "x")) == cli.EXIT_INPUT == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "avg-rank" in err[0]
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert main(["-q"] + allocate_args(tiny_llama_dir, text_file, blocked, "--json")) == cli.EXIT_IO == 4
    captured = capsys.readouterr()
    assert captured.out == ""  # no partial JSON
    assert captured.err.startswith("sensitivity-lora: error: ") and len(captured.err.splitlines()) == 1


def test_a_refused_hessians_run_leaves_no_export_folder(tiny_llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "new" / "export"
    assert main(hessians_args(tiny_llama_dir, text_file, out, "--targets", "no_such_module")) == cli.EXIT_INPUT
    assert "no_such_module" in capsys.readouterr().err
    assert not out.exists()  # refused after the model was loaded: nothing made
    file = tmp_path / "a_file"
    file.write_text("x")
    assert main(hessians_args(tiny_llama_dir, text_file, file / "export")) == cli.EXIT_IO  # refused before loading

