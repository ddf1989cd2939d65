"""The tuned-learning-rate comparison against hand-computed cases."""
from __future__ import annotations

import json
import math

import pytest

from sensitivity_lora.evaluation.quality import lr_grid_table, tuned_lrs, tuned_rows, tuned_table
from sensitivity_lora.evaluation.report import write_report


def _rec(method, lr, seed, score, split, task="causal_lm", **extra):
    key = "perplexity" if task == "causal_lm" else "accuracy"
    return {"task": task, "method": method, "avg_rank": 4, "seed": seed, "lr": lr, "split": split, key: score,
            "setup_seconds": 1.0, "lora_params": 100, **extra}


RECORDS = [
    _rec("uniform", 1e-3, 0, 23.0, "validation"), _rec("uniform", 3e-3, 0, 21.0, "validation"),
    _rec("sra-cov", 1e-3, 0, 20.0, "validation"), _rec("sra-cov", 3e-3, 0, 22.0, "validation"),
    _rec("eva", 1e-3, 0, 21.5, "validation"), _rec("eva", 3e-3, 0, 21.5, "validation"),
    _rec("uniform", 3e-3, 0, 21.0, "test"), _rec("uniform", 3e-3, 1, 21.4, "test"),
    _rec("uniform", 1e-3, 0, 99.0, "test"),  # not its tuned rate: left out
    _rec("sra-cov", 1e-3, 0, 20.5, "test"), _rec("sra-cov", 1e-3, 1, 20.7, "test"),
    _rec("eva", 1e-3, 0, 21.2, "test"), _rec("eva", 1e-3, 1, 21.0, "test"),
    _rec("pissa", 1e-3, 0, 22.0, "test"), _rec("pissa", 1e-3, 1, 22.0, "test"),  # no grid: its only rate
]


def test_tuned_rates_are_the_best_validation_means_ties_to_the_smaller_rate():
    assert tuned_lrs(RECORDS, "causal_lm", 4) == {"uniform": 3e-3, "sra-cov": 1e-3, "eva": 1e-3}


def test_paired_differences_against_uniform_and_the_best_peer():
    rows = {r["method"]: r for r in tuned_rows(RECORDS, "causal_lm", 4)}
    assert set(rows) == {"uniform", "sra-cov", "eva", "pissa"}
    assert rows["uniform"]["perplexity"] == pytest.approx((21.2, math.sqrt(0.08)))
    assert rows["sra-cov"]["best_peer"] == "eva"  # eva 21.1 beats pissa 22.0
    assert rows["sra-cov"]["vs_uniform"] == pytest.approx((-0.6, math.sqrt(0.02)))
    assert rows["sra-cov"]["vs_best_peer"] == pytest.approx((-0.5, math.sqrt(0.08)))
    assert rows["eva"]["vs_best_peer"] is None and rows["eva"]["peer"] and not rows["sra-cov"]["peer"]
    assert rows["pissa"]["lr"] == 1e-3


def test_higher_is_better_for_accuracy():
    records = [_rec("uniform", 1e-3, 0, 0.80, "validation", "classification"),
               _rec("uniform", 3e-3, 0, 0.90, "validation", "classification")]
    assert tuned_lrs(records, "classification", 4) == {"uniform": 3e-3}


def test_tables_mark_the_tuned_rate_and_the_rate_dependence():
    grid = lr_grid_table(RECORDS, "causal_lm", 4)
    assert "| uniform | 23.00 | **21.00** | 2.00 |" in grid
    assert "| eva | **21.50** | 21.50 | 0.00 |" in grid
    table = tuned_table(RECORDS, "causal_lm", 4)
    assert "| sra-cov | 0.001 | 2 | 20.60 ± 0.14 | -0.60 ± 0.14 | -0.50 ± 0.28 |" in table
    assert "Δ vs best peer (eva)" in table


def test_report_of_a_learning_rate_study(tmp_path):
    (tmp_path / "study.json").write_text(json.dumps(RECORDS))
    write_report(tmp_path, tmp_path / "out")
    text = (tmp_path / "out" / "tables.md").read_text()
    assert "learning-rate grid (validation split)" in text and "each method at its tuned rate" in text


def test_summary_rows_keep_learning_rates_apart_and_pair_within_a_rate():
    from sensitivity_lora.evaluation.report import summarize

    records = [_rec("uniform", 1e-3, 0, 20.0, "test"), _rec("uniform", 1e-2, 0, 30.0, "test"),
               _rec("sra", 1e-3, 0, 19.0, "test"), _rec("sra", 1e-2, 0, 35.0, "test")]
    rows = {(r["method"], r["lr"]): r for r in summarize(records)}
    assert len(rows) == 4 and all(r["n_seeds"] == 1 for r in rows.values())
    assert rows[("sra", 1e-3)]["perplexity_vs_uniform"] == pytest.approx((-1.0, 0.0))
    assert rows[("sra", 1e-2)]["perplexity_vs_uniform"] == pytest.approx((5.0, 0.0))


def test_a_results_file_without_learning_rates_is_not_resumed_into(tmp_path):
    from sensitivity_lora.errors import FileFormatError
    from sensitivity_lora.evaluation.store import ResultStore

    path = tmp_path / "old.json"
    legacy = {k: v for k, v in _rec("uniform", None, 0, 20.0, "test").items() if k not in ("lr", "split")}
    path.write_text(json.dumps([legacy, {"task": "causal_lm", "method": "base", "avg_rank": 0, "seed": 0}]))
    with pytest.raises(FileFormatError, match="another --out"):
        ResultStore(path).check_resumable()
    fresh = tmp_path / "new.json"
    fresh.write_text(json.dumps([_rec("uniform", 1e-3, 0, 20.0, "test", n_val=32)]))
    store = ResultStore(fresh)
    store.check_resumable()
    assert store.has("causal_lm", "uniform", 4, 0, 1e-3, "test", 32)
    assert not store.has("causal_lm", "uniform", 4, 0, 1e-3, "test", 0)  # another training pool


def test_rates_from_another_folder_choose_the_rows(tmp_path):
    """A second model's test runs at the rates tuned on the first model's validation split (``--rates-from``)."""
    tuning, other = tmp_path / "smollm2", tmp_path / "gemma"
    tuning.mkdir(), other.mkdir()
    (tuning / "grid.json").write_text(json.dumps([r for r in RECORDS if r["split"] == "validation"]))
    (other / "runs.json").write_text(json.dumps([
        _rec("uniform", 1e-3, 0, 30.0, "validation"), _rec("uniform", 3e-3, 0, 35.0, "validation"),  # its own grid
        _rec("uniform", 3e-3, 0, 19.0, "test"), _rec("uniform", 1e-3, 0, 18.0, "test"),
        _rec("sra-cov", 1e-3, 0, 18.5, "test"), _rec("sra-cov", 3e-3, 0, 99.0, "test")]))
    write_report(other, tmp_path / "own")
    own = (tmp_path / "own" / "tables.md").read_text()
    assert "| uniform | 0.001 | 1 | 18.00" in own and "sra-cov" not in own.split("test split")[1]  # no grid: 2 rates
    write_report(other, tmp_path / "out", rates_from=tuning)
    text = (tmp_path / "out" / "tables.md").read_text()
    assert f"rates tuned on the validation split of {tuning}" in text
    assert "| uniform | 0.003 | 1 | 19.00" in text and "| sra-cov | 0.001 | 1 | 18.50" in text
    tests_only = tmp_path / "tests_only"
    tests_only.mkdir()
    (tests_only / "runs.json").write_text(json.dumps([r for r in RECORDS if r["split"] == "test"]))
    with pytest.raises(ValueError, match="no validation-split runs"):
        write_report(other, tmp_path / "bad", rates_from=tests_only)
    assert not (tmp_path / "bad").exists()
