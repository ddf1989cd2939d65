"""The command, end to end on a tiny saved model and a text file."""
from __future__ import annotations

import json

import pytest

from sensitivity_lora.cli import main

TEXTS = [f"Sample number {i} talks about markets, music, elections and football in turn." * (1 + i % 3)
         for i in range(12)]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def _allocate(model_dir, data, out, *extra):
    return main(["allocate", "--model", str(model_dir), "--data", str(data), "--out", str(out),
                 "--avg-rank", "4", "--max-samples", "12", "--seq-len", "32", "--batch-size", "4", "--quiet", *extra])


def test_allocate_writes_the_three_files_and_exact_budget(tiny_llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert _allocate(tiny_llama_dir, text_file, out) == 0
    printed = capsys.readouterr().out
    assert "verified" in printed
    result = json.loads((out / "allocation.json").read_text())
    modules = result["modules"]
    assert result["method"] == "sra" and result["avg_rank"] == 4
    assert sum(m["rank"] for m in modules.values()) == 4 * len(modules) == result["budget"]
    for m in modules.values():
        assert {"rank", "theta", "trace", "topk", "eff_rank", "d_in", "d_out"} <= set(m)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert len(config["rank_pattern"]) == len(modules)
    assert (out / "ranks.png").stat().st_size > 1000


def test_compare_prints_kendall_tau(tiny_llama_dir, text_file, tmp_path, capsys):
    assert _allocate(tiny_llama_dir, text_file, tmp_path / "a", "--no-plot", "--no-verify") == 0
    assert _allocate(tiny_llama_dir, text_file, tmp_path / "b", "--no-plot", "--no-verify", "--method", "pra") == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a" / "allocation.json"), str(tmp_path / "b" / "allocation.json")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "kendall_tau=1.0000"  # same data and θ: identical orderings whatever the rank rule


@pytest.mark.parametrize("extra, message", [
    (["--avg-rank", "0"], "avg-rank"),
    (["--energy", "1.5"], "energy"),
    (["--target-modules", "nonexistent"], "no linear layer matches"),
    (["--avg-rank", "4", "--r-min", "9"], "budget"),
])
def test_bad_input_is_a_clear_error(tiny_llama_dir, text_file, tmp_path, capsys, extra, message):
    assert _allocate(tiny_llama_dir, text_file, tmp_path / "out", *extra) == 2
    assert message in capsys.readouterr().err


def test_unreadable_data_path(tiny_llama_dir, tmp_path, capsys):
    assert _allocate(tiny_llama_dir, tmp_path / "missing.txt", tmp_path / "out") == 2
    assert "missing.txt" in capsys.readouterr().err


def test_streaming_flag_gives_the_same_allocation(tiny_llama_dir, text_file, tmp_path):
    assert _allocate(tiny_llama_dir, text_file, tmp_path / "a", "--no-plot", "--no-verify", "--hessian", "full") == 0
    assert _allocate(tiny_llama_dir, text_file, tmp_path / "b", "--no-plot", "--no-verify", "--hessian", "full",
                     "--streaming") == 0
    a = json.loads((tmp_path / "a" / "allocation.json").read_text())["modules"]
    b = json.loads((tmp_path / "b" / "allocation.json").read_text())["modules"]
    assert a == b
