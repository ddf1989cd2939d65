"""``sensitivity-lora hessians``: write every input group's Hessian to safetensors files.

    sensitivity-lora hessians --out hessians/                      # SmolLM2 on BBC text, full H
    sensitivity-lora hessians --out h/ --model M --data D --resume # continue an interrupted run
    torchrun --nproc_per_node 2 -m sensitivity_lora.cli hessians --out h/   # data-parallel

Read them back with ``sensitivity_lora.hessian_io.load_hessians(DIR, convention=...)``.
"""
from __future__ import annotations

import argparse
import time


def add_parser(subparsers) -> None:
    """Register ``hessians`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "hessians", help="calibrate and export per-input-group Hessians (safetensors)",
        description="Calibrate a model on text, block by block, and write one safetensors file per input group "
                    "(raw fp64 Σxxᵀ and Σx², token/sequence counts, member modules, normalisation in the "
                    "metadata) plus index.json. Under torchrun/accelerate launch the batches are sharded over "
                    "the processes, the sums all-reduced, and rank 0 writes.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", help="local model folder or .gguf file (default: SmolLM2-135M)")
    p.add_argument("--data", help="text file, .jsonl, folder of .txt files or datasets folder (default: BBC News)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--max-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle that picks the calibration samples")
    p.add_argument("--target-modules", nargs="+", help="module names as PEFT matches them (default: all block linears)")
    p.add_argument("--target-regex", help="a regex matched against full module names")
    p.add_argument("--hessian", choices=("full", "diag"), default="full", help="diag writes only Σx²")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--backend", choices=("auto", "reference", "cpu", "cuda", "triton"))
    p.add_argument("--device", help="where blocks run (e.g. cuda); weights stay where loaded and visit it in turn")
    p.add_argument("--cache-device", help="where hidden states wait between blocks (e.g. cpu)")
    p.add_argument("--no-streaming", action="store_true", help="one pass with hooks on the whole model")
    p.add_argument("--resume", action="store_true", help="continue an interrupted export in --out")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_hessians)


def cmd_hessians(args: argparse.Namespace) -> int:
    import torch

    from .data import calibration_batches, load_texts
    from .distributed import compute_device, export_hessians_distributed, init_from_env, rank_and_world
    from .models import load_model_and_tokenizer

    distributed = init_from_env()
    rank, world = rank_and_world()
    device = args.device or (str(compute_device()) if distributed else None)
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None)
    texts = load_texts(args.data, max_samples=args.max_samples, shuffle_seed=args.seed, text_field=args.text_field)
    batches = calibration_batches(texts, tokenizer, seq_len=args.seq_len, batch_size=args.batch_size)
    settings = {"model": args.model or "SmolLM2-135M", "data": args.data or "BBC News", "n_samples": len(texts),
                "seq_len": args.seq_len, "hessian": args.hessian}
    export_hessians_distributed(
        model, batches, args.out, args.target_regex or args.target_modules, args.hessian,
        None if args.backend in (None, "auto") else args.backend, streaming=not args.no_streaming,
        resume=args.resume, progress=not args.quiet and rank == 0, settings=settings, device=device,
        cache_device=args.cache_device)
    if rank == 0:
        print(f"wrote the Hessians of {len(texts)} samples to {args.out} ({world} process(es), "
              f"{time.perf_counter() - t0:.1f} s); load them with "
              "sensitivity_lora.hessian_io.load_hessians(DIR, convention='2/tokens')")
    return 0
