"""``sensitivity-lora allocate`` and ``sensitivity-lora compare``."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ..settings import AUTO_INIT
from . import options

logger = logging.getLogger(__name__)

DEFAULT_OUT = "sensitivity_lora_out"
WEIGHTS_FILE = "initial_weights.safetensors"


def add_parsers(sub) -> None:
    p = sub.add_parser("allocate", help="calibrate a model on text and allocate LoRA ranks",
                       description="Calibrate a model on text, score every target matrix by its Hessian "
                                   "sensitivity and allocate LoRA ranks, and start every adapter from the "
                                   "top eigenvectors of its input covariance (--init). With no --model/--data: "
                                   "SmolLM2-135M on BBC News articles.")
    options.add_model_and_data(p)
    p.add_argument("--avg-rank", type=options.positive_float, default=8.0,
                   help="average LoRA rank r̄ (budget = r̄ × #modules)")
    options.add_allocation_settings(p, auto_init=True)  # --init auto: covariance for a causal LM (docs/results.md)
    p.add_argument("--lora-alpha", type=options.positive_float, help="lora_alpha of uniform LoRA at rank r̄ (default: 2·r̄)")
    p.add_argument("--streaming", action="store_true",
                   help="run the model one block at a time (same result; holds one block's Hessians)")
    p.add_argument("--checkpoint-dir", help="save finished blocks here and resume from them (implies "
                                            "--streaming; default: none)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder")
    p.add_argument("--no-plot", action="store_true", help="do not write ranks.png")
    p.add_argument("--no-verify", action="store_true", help="skip building the PEFT model to verify the ranks")
    p.add_argument("--json", action="store_true",
                   help="print the summary as one JSON object, and nothing else, on stdout (the human-readable "
                        "messages go to stderr)")
    p.set_defaults(func=cmd_allocate)

    c = sub.add_parser("compare", help="Kendall τ-b between the θ orderings of two allocations")
    c.add_argument("a", help="an allocation.json")
    c.add_argument("b", help="another allocation.json")
    c.set_defaults(func=cmd_compare)


OUTPUTS = ("allocation.json", "adapter_config.json", WEIGHTS_FILE, "ranks.png")  # one set: all or none


def cmd_allocate(args: argparse.Namespace) -> int:
    """Allocate (see :func:`_allocate`), then the rank table on stdout, or with --json the summary."""
    if not args.json:
        run = _allocate(args)
        print(_text(run))
        return 0
    with contextlib.redirect_stdout(sys.stderr):  # whatever prints on the way cannot reach the JSON
        run = _allocate(args)
    print(json.dumps(_summary(run), indent=2, allow_nan=False))
    return 0


def _allocate(args: argparse.Namespace) -> dict[str, Any]:
    """Calibrate, allocate, build and check every output, then write them all at once.

    Order: options checked → the output folder locked (OutputInUseError for a second run) →
    model, data, calibration → allocation.json, adapter_config.json, initial weights and
    ranks.png built in a staging folder → the PEFT model built from the staged config and
    verified → the set replaces the old one in one commit. A failure (or a kill) before the
    commit leaves the old set untouched.
    """
    from ..api import compute_allocation
    from ..errors import MissingPackageError
    from ..folders import FileSet, check_output_folder, output_lock
    from ..peft import check_lora_alpha, lora_config, lora_config_json
    from ..models import is_causal_lm
    from ..report import plot_ranks
    from ..settings import check_avg_rank

    settings = options.allocation_settings(args)  # bad settings fail before the model is loaded
    check_avg_rank(args.avg_rank)
    check_lora_alpha(args.lora_alpha)
    if args.checkpoint_dir is not None:  # checked, not created: a run refused later leaves no empty folder
        check_output_folder(args.checkpoint_dir, "checkpoint folder")
    t0 = time.perf_counter()
    with output_lock(args.out) as out, FileSet(out, replaces=OUTPUTS) as files:
        model, _, texts, batches = options.load_model_and_batches(args)
        settings = options.allocation_settings(args, model)  # --init auto resolved for this model
        logger.debug("%d calibration samples in %d batches; %s", len(texts), len(batches), settings)
        t1 = time.perf_counter()
        allocation = compute_allocation(model, batches, args.avg_rank, settings,
                                        target_modules=options.targets(args), backend=options.backend(args),
                                        progress=not args.quiet, streaming=args.streaming,
                                        checkpoint_dir=args.checkpoint_dir)
        t2 = time.perf_counter()
        allocation.settings.update(options.data_record(args, texts))
        task_type = "CAUSAL_LM" if is_causal_lm(model) else None
        config = lora_config(allocation, args.lora_alpha, task_type=task_type)
        if args.model is None:
            from ..models import default_model_dir

            config.base_model_name_or_path = str(default_model_dir())
        else:
            config.base_model_name_or_path = str(args.model)
        allocation.save(files.path("allocation.json"))
        if allocation.initial_weights is not None:
            allocation.save_initial_weights(files.path(WEIGHTS_FILE))
        files.write_text("adapter_config.json", lora_config_json(config))
        if not args.no_plot:
            try:
                plot_ranks(allocation, files.path("ranks.png"))
            except MissingPackageError as exc:
                files.forget("ranks.png")
                logger.warning("skipped ranks.png: %s", exc)
        if not args.no_verify:
            _verify(model, allocation, files.staging)
        files.commit()  # everything is built and checked: the new set replaces the old one
    written = [str(out / n) for n in OUTPUTS if n in files.names]
    logger.info("calibration + scoring %.1f s on %d samples (total %.1f s); wrote %s",
                t2 - t1, len(texts), time.perf_counter() - t0, ", ".join(written))
    return {"allocation": allocation, "init": settings.init, "init_option": args.init, "verified": not args.no_verify, "written": written,
            "seconds": {"calibration_and_scoring": round(t2 - t1, 3), "total": round(time.perf_counter() - t0, 3)}}


def _text(run: dict[str, Any]) -> str:
    """The rank table and what was verified and initialised, for people."""
    from ..report import rank_table

    allocation = run["allocation"]
    lines = [rank_table(allocation)]
    if run["verified"]:
        lines.append("verified: the PEFT model built from adapter_config.json has exactly the allocated ranks"
                     + (" and takes the initial weights" if allocation.initial_weights is not None else ""))
    auto = run["init_option"] == AUTO_INIT
    if run["init"] != "none":
        why = " (--init auto, the default, for a causal LM; --init none keeps PEFT's own)" if auto else ""
        scale = allocation.settings.get("init_scale", "unit")
        rows = "rows at the input gain of PEFT's default A" if scale == "default-gain" else "unit rows"
        lines.append(f"initialisation: {run['init']}{why}: A from the calibration's input statistics ({rows}), "
                     f"B = 0 ({allocation.settings.get('decompositions')} decompositions{_solvers(allocation.settings)})")
    elif auto:
        lines.append("initialisation: PEFT's own (--init auto, the default, for a model that is not a causal LM; "
                     "--init covariance starts A from the input statistics)")
    return "\n".join(lines)


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    """The --json object: ranks, budget, settings, what was written (timings only here, never in the files)."""
    allocation = run["allocation"]
    return {"method": allocation.method, "avg_rank": allocation.avg_rank, "budget": allocation.budget,
            "budget_mode": allocation.budget_mode, "rank_sum": allocation.total_rank(),
            "trainable_params": allocation.trainable_params(), "n_modules": len(allocation.modules),
            "ranks": allocation.ranks(), "init": run["init"], "verified": run["verified"],
            "settings": allocation.settings, "outputs": run["written"], "seconds": run["seconds"]}


def _verify(model, allocation, folder: Path) -> None:
    """The staged files read back as a user would: allocation.json equals the allocation, the PEFT model
    built from adapter_config.json has its ranks and takes the initial weights. The model is restored after."""
    import dataclasses

    from peft import LoraConfig, get_peft_model

    from ..calibration.model_state import ModelState
    from ..peft import apply_initial_weights, verify_ranks
    from ..scoring import Allocation
    from ..scoring.result import load_initial_weights

    if Allocation.load(folder / "allocation.json").to_dict() != allocation.to_dict():
        raise RuntimeError("allocation.json does not read back as the allocation it was written from")
    state = ModelState.capture(model)
    try:
        peft_model = get_peft_model(model, LoraConfig.from_pretrained(str(folder)))
        verify_ranks(peft_model, allocation)
        if allocation.initial_weights is not None:
            loaded = load_initial_weights(folder / WEIGHTS_FILE, allocation)
            apply_initial_weights(peft_model, dataclasses.replace(allocation, initial_weights=loaded))
    finally:
        state.restore()


def cmd_compare(args: argparse.Namespace) -> int:
    import math

    from ..scoring import Allocation, kendall_tau

    a, b = Allocation.load(args.a), Allocation.load(args.b)
    tau = kendall_tau(a, b)  # refuses fewer than 2 common modules
    if math.isnan(tau):
        constant = args.a if len({m.theta for m in a.modules.values()}) == 1 else args.b
        raise ValueError(f"Kendall's τ is undefined: θ is the same for every module of {constant}, so it orders "
                         "nothing")
    common = [n for n in a.modules if n in b.modules]
    same = sum(a.modules[n].rank == b.modules[n].rank for n in common)
    print(f"{len(common)} common modules; {same} with the same rank")
    print(f"kendall_tau={tau:.4f}")
    return 0


def _solvers(settings: dict) -> str:
    """ ": block for 120, on 2 torch threads": the eigen solvers the initialisation used and the threads they had
    (block and dense run in torch's intra-op threads; ARPACK, only when asked for by name, in the BLAS's)."""
    used = settings.get("eigen_solvers") or {}
    if not used:
        return ""
    import torch

    return ": " + ", ".join(f"{s} for {n}" for s, n in used.items()) + f", on {torch.get_num_threads()} torch threads"
