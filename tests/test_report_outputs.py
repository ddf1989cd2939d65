"""`evaluate report` and the results store: nothing to write is refused, a report set is replaced whole,
unreadable files are named."""
from __future__ import annotations

import json

import pytest

from sensitivity_lora.cli import main
from sensitivity_lora.errors import FileFormatError, MissingInputError
from sensitivity_lora.evaluation.report import write_report
from sensitivity_lora.evaluation.store import ResultStore

RECORD = {"task": "causal_lm", "method": "uniform", "avg_rank": 4, "seed": 0, "perplexity": 20.0,
          "rank_sum": 8, "lora_params": 10, "rank_max": 4, "setup_seconds": 0.1, "train_seconds": 1.0}


@pytest.fixture
def old_report(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    for name, text in {"tables.md": "old tables", "summary.json": "[]", "causal_lm_perplexity.png": "old plot",
                       "classification_accuracy.png": "old plot", "mine.png": "not ours"}.items():
        (out / name).write_text(text)
    return out


def _contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_missing_results_folder_is_refused_and_the_old_report_is_untouched(tmp_path, old_report, capsys):
    before = _contents(old_report)
    assert main(["evaluate", "report", "--results", str(tmp_path / "typo"), "--out", str(old_report)]) == 2
    assert "typo" in capsys.readouterr().err
    assert _contents(old_report) == before
    with pytest.raises(MissingInputError):
        write_report(tmp_path / "typo", old_report)


def test_a_folder_without_records_is_refused(tmp_path, old_report):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "other.json").write_text(json.dumps({"not": "records"}))
    before = _contents(old_report)
    with pytest.raises(ValueError, match="no run records"):
        write_report(empty, old_report)
    assert _contents(old_report) == before


def test_a_new_report_replaces_the_old_set_whole(tmp_path, old_report):
    results = tmp_path / "results"
    results.mkdir()
    (results / "runs.json").write_text(json.dumps([RECORD]))
    write_report(results, old_report)
    after = _contents(old_report)
    assert after["tables.md"] != b"old tables" and b"uniform" in after["tables.md"]
    assert after["mine.png"] == b"not ours"  # not a file of the report's
    assert "classification_accuracy.png" not in after  # a plot of the old set that this report does not make
    if "causal_lm_perplexity.png" in after:  # made again (matplotlib installed): a real PNG now
        assert (old_report / "causal_lm_perplexity.png").read_bytes()[:4] == b"\x89PNG"
    assert not any(name.startswith(".sensitivity-lora") for name in after)


def test_a_corrupt_results_file_is_named(tmp_path):
    bad = tmp_path / "runs.json"
    bad.write_text('[{"task": "causal_lm", "method": "unif')
    with pytest.raises(FileFormatError, match="runs.json"):
        ResultStore(bad)
    with pytest.raises(FileFormatError, match="runs.json"):
        write_report(tmp_path, tmp_path / "out")
    assert bad.read_text() == '[{"task": "causal_lm", "method": "unif'


def test_a_folder_mixing_models_or_domains_is_refused(tmp_path, old_report):
    results = tmp_path / "results"
    results.mkdir()
    smol, gemma = ({**RECORD, "model": m, "category": "tech"} for m in ("smollm2-135m", "gemma3-270m"))
    (results / "a.json").write_text(json.dumps([smol, {**RECORD, "seed": 1}]))  # a record without the field: taken
    write_report(results, old_report)
    (results / "b.json").write_text(json.dumps([gemma]))  # same run key, another model: would be averaged in
    before = _contents(old_report)
    with pytest.raises(ValueError, match="more than one model .gemma3-270m, smollm2-135m"):
        write_report(results, old_report)
    (results / "b.json").write_text(json.dumps([{**smol, "category": "python-docs"}]))
    with pytest.raises(ValueError, match="more than one category"):
        write_report(results, old_report)
    assert _contents(old_report) == before
