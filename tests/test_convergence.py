"""Steps-to-target from loss and held-out curves, against hand-computed cases."""
from __future__ import annotations

import pytest

from sensitivity_lora.evaluation.convergence import (convergence_rows, convergence_table, first_eval_reaching,
                                                     first_step_at_or_below, smoothed)


def test_trailing_mean_by_hand():
    assert smoothed([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]
    assert smoothed([1.0, 2.0, 3.0], 10) == [1.0, 1.5, 2.0]


def test_first_steps_by_hand():
    assert first_step_at_or_below([3.0, 2.0, 1.0], 2.0) == 2
    assert first_step_at_or_below([3.0, 2.0], 1.0) is None
    points = [{"step": 5, "accuracy": 0.5}, {"step": 10, "accuracy": 0.9}, {"step": 15, "accuracy": 0.8}]
    assert first_eval_reaching(points, "accuracy", 0.85, True) == 10
    assert first_eval_reaching([{"step": 5, "perplexity": 30.0}, {"step": 10, "perplexity": 20.0}],
                               "perplexity", 25.0, False) == 10


def _run(method, seed, losses, accs, digest="p"):
    return {"task": "classification", "method": method, "avg_rank": 4, "seed": seed, "loss_curve": losses,
            "eval_curve": [{"step": 2 * (i + 1), "accuracy": a} for i, a in enumerate(accs)],
            "accuracy": accs[-1], "train_seconds": 2.0 * len(losses), "steps": len(losses),
            "trainable_params_at_start": 100, "plan_digest": digest + str(seed)}


def test_shared_targets_and_paired_steps_by_hand():
    # window 1: no smoothing. L₀ = mean first loss = 4; L* = max of minima = max(1, 2) = 2.
    # target 0.5 → 3: adalora reaches it at step 3, fast at step 2 (paired −1).
    # target 1.0 → 2: adalora at step 5, fast at step 3 (paired −2).
    # held-out: target = min of best accuracies = min(0.9, 0.8) = 0.8: adalora at step 8, fast at step 4.
    records = [_run("adalora", 0, [4, 3.5, 3, 2.5, 2, 1], [0.2, 0.5, 0.7, 0.9]),
               _run("fast", 0, [4, 3, 2, 2, 2, 2], [0.5, 0.8, 0.8, 0.8]),
               _run("other-data", 0, [9, 9, 9, 9, 9, 9], [0.1, 0.1, 0.1, 0.1], digest="q"),
               _run("fast", 5, [0, 0, 0, 0, 0, 0], [1, 1, 1, 1])]  # no AdaLoRA run at seed 5: not compared
    rows = {r["method"]: r for r in convergence_rows(records, window=1, fractions=(0.5, 1.0))}
    assert set(rows) == {"adalora", "fast"}  # a run on other batches is not compared
    fast, ada = rows["fast"], rows["adalora"]
    assert fast["targets"] == {"loss@0.5": 3.0, "loss@1": 2.0} and fast["held_out_target"] == 0.8
    assert ada["loss@0.5"] == (3.0, 0.0) and fast["loss@0.5"] == (2.0, 0.0)
    assert fast["loss@0.5_vs_adalora"] == (-1.0, 0.0) and fast["loss@1_vs_adalora"] == (-2.0, 0.0)
    assert ada["accuracy@target"] == (8.0, 0.0) and fast["accuracy@target_vs_adalora"] == (-4.0, 0.0)
    assert ada["loss@1_vs_adalora"] is None and fast["seconds_per_step"] == (2.0, 0.0)
    table = convergence_table(list(rows.values()), "classification", 4)
    assert "| fast | 1 | 2.0 ± 0.0; -1.0 ± 0.0 |" in table and "80.00" in table


def test_steps_are_averaged_over_seeds():
    records = [_run("adalora", 0, [4, 3, 2, 1], [0.5, 0.9]), _run("adalora", 1, [4, 4, 4, 2], [0.5, 0.6])]
    (row,) = convergence_rows(records, window=1, fractions=(1.0,))
    # L* = max(1, 2) = 2: both reach it (steps 3 and 4)
    assert row["loss@1"] == (3.5, pytest.approx(0.7071, abs=1e-4)) and row["loss@1_missed"] == 0


def test_runs_without_held_out_points_are_left_out_of_the_held_out_column():
    plain = _run("adalora", 1, [4, 3, 2, 1], [0.5, 0.9])
    del plain["eval_curve"]
    records = [_run("adalora", 0, [4, 3, 2, 1], [0.5, 0.9]), plain]
    (row,) = convergence_rows(records, window=1, fractions=(1.0,))
    assert row["n_seeds"] == 2 and row["loss@1"] == (4.0, 0.0)  # L* = 1, both runs
    assert row["accuracy@target"] == (4.0, 0.0) and row["accuracy@target_missed"] == 0  # seed 0 only
