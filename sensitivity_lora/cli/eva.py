"""``sensitivity-lora eva``: PEFT EVA's initial state dict from one calibration pass, and nothing else.

    sensitivity-lora eva --out eva_state_dict.pt                     # SmolLM2 on BBC text, r̄ = 8, ρ = 2
    sensitivity-lora eva --out eva.safetensors --model M --data D --avg-rank 16

The file holds what ``peft.tuners.lora.eva.get_eva_state_dict`` returns ({module: A}, keys with
the ``base_model.model.`` prefix of a PeftModel), for
``initialize_lora_eva_weights(peft_model, eva_state_dict=torch.load(FILE))`` with a LoraConfig of
the same ``r`` and ``eva_config.rho``: EVA's ranks and A, computed exactly (docs/method.md §7).
"""
from __future__ import annotations

import argparse
import logging
import time

from ..init.state import PEFT_MODEL_PREFIX
from . import options

logger = logging.getLogger(__name__)
SUFFIXES = (".pt", ".safetensors")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eva", help="write PEFT EVA's initial state dict, computed exactly from one pass",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the file to write: .pt (torch.save) or .safetensors")
    options.add_model_and_data(p)
    p.add_argument("--avg-rank", type=options.positive_int, default=8, help="LoraConfig.r (the rank budget r̄ per module)")
    p.add_argument("--rho", type=options.finite_float, default=2.0,
                   help="EvaConfig.rho: no module gets more than round(ρ·r̄) components")
    p.add_argument("--prefix", default=PEFT_MODEL_PREFIX,
                   help="prefix of the keys (PEFT's own: the module names inside a PeftModel)")
    p.add_argument("--streaming", action="store_true", help="run the model one block at a time (same result)")
    p.set_defaults(func=cmd_eva)


def cmd_eva(args: argparse.Namespace) -> int:
    from ..api import compute_allocation
    from pathlib import Path

    from ..files import atomic_save_safetensors, atomic_write
    from ..folders import ensure_output_folder
    from ..settings import AllocationSettings

    if not args.out.endswith(SUFFIXES):
        raise ValueError(f"--out must end in {' or '.join(SUFFIXES)}, got {args.out!r}")
    settings = AllocationSettings(init="eva", init_rho=args.rho)  # bad settings fail before the model is loaded
    ensure_output_folder(Path(args.out).parent, "folder of --out")
    t0 = time.perf_counter()
    model, _, texts, batches = options.load_model_and_batches(args)
    allocation = compute_allocation(model, batches, args.avg_rank, settings, target_modules=options.targets(args),
                                    backend=options.backend(args), progress=not args.quiet,
                                    streaming=args.streaming)
    state = {k: v.contiguous() for k, v in allocation.eva_state_dict(args.prefix).items()}  # rank 0: (0, d_in)
    if args.out.endswith(".safetensors"):
        atomic_save_safetensors(args.out, state, {"format": "peft-eva-state-dict", "r": str(args.avg_rank),
                                                  "rho": str(args.rho)})
    else:
        import torch

        atomic_write(args.out, lambda tmp: torch.save(state, tmp))
    ranks = [v.shape[0] for v in state.values()]
    logger.info("wrote %s: %d modules (%d at rank 0), Σ r = %d (budget %d), %.1f s", args.out, len(state),
                ranks.count(0), sum(ranks),
                args.avg_rank * len(allocation.modules), time.perf_counter() - t0)
    return 0
