"""Does the sensitivity ordering wobble? Kendall τ-b between θ orderings (the shape of the paper's Tables 4–6).

Three studies, each a list of allocations compared with
:func:`sensitivity_lora.allocation.kendall_tau`:

- domains: calibrate on each BBC category and on a non-news text source;
- sizes: calibrate on 10 %, 20 %, 50 % and 100 % of one set (nested prefixes);
- training: fine-tune uniform LoRA, and after each epoch merge the adapter into
  a copy of the model and calibrate again.

The non-news source is the docstrings of Python's standard library
(:func:`stdlib_docstrings`): real English technical prose that every Python
installation carries offline.
"""
from __future__ import annotations

import ast
import copy
import random
import sysconfig
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from .finetune import TrainConfig, train


def stdlib_docstrings(n: int, min_chars: int = 400, seed: int = 0) -> list[str]:
    """``n`` docstrings of at least ``min_chars`` characters from the standard library's source, seeded.

    Files are read in a seeded order and reading stops once ``n`` are found, so a
    small request parses a few modules, not the whole library.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [p for p in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py"))
             if not (p.name.startswith("test") or p.parent.name.startswith(("test", "idlelib")))]  # prose, not tests
    random.Random(seed).shuffle(paths)
    found: list[str] = []
    for path in paths:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    found.append(doc)
        if len(found) >= n:
            return found[:n]
    raise ValueError(f"only {len(found)} stdlib docstrings have ≥ {min_chars} characters; ask for fewer")


def _allocate(model: nn.Module, tokenizer, texts: Sequence[str], seq_len: int, batch_size: int,
              avg_rank: int, settings: dict[str, Any]):
    from ..data import calibration_batches
    from ..api import compute_allocation

    batches = calibration_batches(list(texts), tokenizer, seq_len=seq_len, batch_size=batch_size)
    return compute_allocation(model, batches, avg_rank=avg_rank, progress=False, **settings)


def tau_matrix(allocations: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Kendall τ-b between every pair of allocations (θ orderings)."""
    from ..scoring import kendall_tau

    names = list(allocations)
    return {a: {b: (1.0 if a == b else float(kendall_tau(allocations[a], allocations[b]))) for b in names}
            for a in names}


def rank_changes(a: Any, b: Any) -> int:
    """How many modules get a different rank in ``b`` than in ``a``."""
    ra, rb = a.ranks(), b.ranks()
    return sum(ra[n] != rb.get(n) for n in ra)


def domain_study(model: nn.Module, tokenizer, domains: dict[str, Sequence[str]], seq_len: int = 128,
                 batch_size: int = 8, avg_rank: int = 4, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """τ-b between the allocations calibrated on each domain's texts."""
    allocations, seconds = {}, {}
    for name, texts in domains.items():
        start = time.perf_counter()
        allocations[name] = _allocate(model, tokenizer, texts, seq_len, batch_size, avg_rank, settings or {})
        seconds[name] = time.perf_counter() - start
    names = list(allocations)
    changes = {a: {b: rank_changes(allocations[a], allocations[b]) for b in names} for a in names}
    return {"tau": tau_matrix(allocations), "rank_changes": changes, "seconds": seconds,
            "n_texts": {k: len(v) for k, v in domains.items()}, "ranks": {k: a.ranks() for k, a in allocations.items()}}


def size_study(model: nn.Module, tokenizer, texts: Sequence[str], fractions: Sequence[float] = (0.1, 0.2, 0.5, 1.0),
               seq_len: int = 128, batch_size: int = 8, avg_rank: int = 4,
               settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """τ-b of the allocation from each prefix fraction of ``texts`` against the one from all of them."""
    if not fractions or max(fractions) != 1.0 or min(fractions) <= 0:
        raise ValueError(f"fractions must lie in (0, 1] and include 1.0, got {list(fractions)}")
    allocations, seconds = {}, {}
    for fraction in sorted(fractions):
        subset = list(texts)[:max(1, round(fraction * len(texts)))]
        start = time.perf_counter()
        allocations[f"{fraction:g}"] = _allocate(model, tokenizer, subset, seq_len, batch_size, avg_rank,
                                                 settings or {})
        seconds[f"{fraction:g}"] = time.perf_counter() - start
    matrix = tau_matrix(allocations)
    full = allocations["1"]
    return {"tau_vs_full": {k: matrix[k]["1"] for k in allocations}, "tau": matrix,
            "rank_changes_vs_full": {k: rank_changes(full, a) for k, a in allocations.items()},
            "n_texts": {k: max(1, round(float(k) * len(texts))) for k in allocations}, "seconds": seconds}


def training_study(model: nn.Module, tokenizer, train_texts: Sequence[str], calibration_texts: Sequence[str],
                   epochs: int, train_config: TrainConfig, avg_rank: int = 4, seq_len: int = 128,
                   batch_size: int = 8, settings: dict[str, Any] | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train uniform LoRA for ``epochs`` (each ``train_config.steps`` steps) and re-allocate after each.

    The allocation after epoch e is calibrated on ``calibration_texts`` with the
    adapter merged into a copy of the model (the trained model itself is untouched).
    """
    from peft import LoraConfig, get_peft_model

    from ..calibration.targets import resolve_targets
    from .causal_lm import lm_tensors

    settings = settings or {}
    allocations = {"0": _allocate(model, tokenizer, calibration_texts, seq_len, batch_size, avg_rank, settings)}
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=avg_rank, lora_alpha=2 * avg_rank, target_modules=resolve_targets(model), task_type="CAUSAL_LM"))
    data = lm_tensors(train_texts, tokenizer, seq_len)
    losses = []
    for epoch in range(1, epochs + 1):
        config = TrainConfig(**{**train_config.__dict__, "seed": train_config.seed + epoch})
        result = train(peft_model, lambda idx: {k: v[idx] for k, v in data.items()}, len(train_texts), config)
        losses.append(sum(result.losses) / len(result.losses))
        merged = copy.deepcopy(peft_model).merge_and_unload()
        allocations[str(epoch)] = _allocate(merged, tokenizer, calibration_texts, seq_len, batch_size, avg_rank,
                                            settings)
        del merged
        log(f"epoch {epoch}: mean train loss {losses[-1]:.3f}")
    matrix = tau_matrix(allocations)
    return {"tau_vs_start": {k: matrix[k]["0"] for k in allocations},
            "tau_vs_previous": {str(e): matrix[str(e)][str(e - 1)] for e in range(1, epochs + 1)},
            "tau": matrix, "epoch_mean_loss": losses,
            "rank_changes_vs_start": {k: rank_changes(allocations["0"], a) for k, a in allocations.items()}}
