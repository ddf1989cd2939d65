"""``sensitivity-lora hessians``: write every input group's Hessian to safetensors files.

    sensitivity-lora hessians --out hessians/                      # SmolLM2 on BBC text, full H
    sensitivity-lora hessians --out h/ --model M --data D --resume # continue an interrupted run
    torchrun --nproc_per_node 2 -m sensitivity_lora hessians --out h/       # data-parallel

Read them back with ``sensitivity_lora.load_hessians(DIR, convention=...)``.
"""
from __future__ import annotations

import argparse
import logging
import time

from ..hessians.storage import DEFAULT_DTYPE, DEFAULT_LAYOUT, DTYPES, LAYOUTS
from ..settings import HESSIAN_MODES
from . import options

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    """Register ``hessians`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "hessians", help="calibrate and export per-input-group Hessians (safetensors)",
        description="Calibrate a model on text, block by block, and write one safetensors file per input group "
                    "(raw fp64 Σxxᵀ, Σx² and Σx, token/sequence counts, member modules, normalisation in the "
                    "metadata) plus index.json. Under torchrun/accelerate launch the batches are sharded over "
                    "the processes, the sums all-reduced, and rank 0 writes.")
    p.add_argument("--out", required=True, help="output folder")
    options.add_model_and_data(p)
    p.add_argument("--hessian", choices=HESSIAN_MODES, default="full", help="diag writes only Σx² and Σx")
    p.add_argument("--device", help="where blocks run (e.g. cuda); weights stay where loaded and visit it in turn "
                                    "(default: where the model is; under torchrun with NCCL, each rank's GPU)")
    p.add_argument("--cache-device", help="where hidden states wait between blocks, e.g. cpu (default: --device)")
    p.add_argument("--no-streaming", action="store_true", help="one pass with hooks on the whole model")
    p.add_argument("--storage-dtype", choices=tuple(DTYPES), default=DEFAULT_DTYPE,
                   help="dtype of Σxxᵀ on disk (float32 halves the files; read back as float64)")
    p.add_argument("--layout", choices=LAYOUTS, default=DEFAULT_LAYOUT,
                   help="upper: only the upper triangle of Σxxᵀ on disk (about half; read back full)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the interrupted export in --out (refused unless model, data and settings "
                            "are the same)")
    again.add_argument("--overwrite", action="store_true", help="replace the export already in --out")
    p.set_defaults(func=cmd_hessians)


def cmd_hessians(args: argparse.Namespace) -> int:
    from ..calibration.distributed import compute_device, init_from_env, rank_and_world, single_process_warning
    from ..calibration.validate import check_device
    from ..folders import check_output_folder, ensure_output_folder
    from ..hessians import export_hessians
    from ..hessians.format import check_export_folder

    check_device(args.device), check_device(args.cache_device, "--cache-device")
    check_export_folder(args.out, args.resume, args.overwrite)  # before the model is loaded
    distributed = init_from_env()
    if distributed:  # every process needs the folder before rank 0 takes its lock
        ensure_output_folder(args.out, "export folder")
    else:  # one process: export_hessians makes it under its lock, so a refusal before leaves nothing behind
        check_output_folder(args.out, "export folder")
    if not distributed and (warning := single_process_warning()):
        logger.warning(warning)
    rank, world = rank_and_world()
    device = args.device or (str(compute_device()) if distributed else None)
    t0 = time.perf_counter()
    model, _, texts, batches = options.load_model_and_batches(args)
    settings = {**options.data_record(args, texts), "hessian": args.hessian}
    export_hessians(model, batches, args.out, options.targets(args), args.hessian, options.backend(args),
                    streaming=not args.no_streaming, distributed=distributed, resume=args.resume,
                    overwrite=args.overwrite,
                    progress=not args.quiet and rank == 0, settings=settings, device=device,
                    cache_device=args.cache_device, storage_dtype=args.storage_dtype, layout=args.layout)
    if rank == 0:
        logger.info("wrote the Hessians of %d samples to %s (%d process(es), %.1f s); load them with "
                    "sensitivity_lora.load_hessians(DIR, convention='2/tokens')",
                    len(texts), args.out, world, time.perf_counter() - t0)
    return 0
