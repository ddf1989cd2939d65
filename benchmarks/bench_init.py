"""Initialisers from statistics: eigen-solver timings, and EVA from statistics against PEFT's EVA on SmolLM2.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_init.py

writes ``benchmarks/results/init.json``:

(i) ``decomposition``: top-k eigenpairs of d × d PSD matrices with a decaying spectrum
    (λ_i = 1/i for the first 512, a small positive floor after), d = 576, 1536, 4096, 14336,
    (and 128, 256 for the small-size threshold), k = 16, 32: dense ``torch.linalg.eigh`` (all pairs; once per d) against ARPACK Lanczos
    (``sensitivity_lora.init.decompose``), and scipy's partial ``eigh(subset_by_index)`` for
    reference up to 4096; the agreement of the Lanczos pairs with the dense ones; what "auto" picks.
(ii) ``smollm2``: the same calibration batches (``--texts`` BBC texts, default 32, 128 tokens, in
    batches of ``--batch-size``, default 8: PEFT's estimate depends on the tokens per batch), r = 8,
    ρ = 2, all 210 linear modules: PEFT's ``get_eva_state_dict`` against ``calibrate(hessian="full")``
    + ``eva_init`` (timed together and apart), side by side in one run; the share of modules whose
    ranks equal PEFT's and the mean |cos| of corresponding components; the same two figures for
    PEFT against itself with the batches in reverse order (and for ours likewise); the
    decomposition time with each solver on the real covariances.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sensitivity_lora.init import decompose, eva_init, group_sums_from_statistics  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def decaying_matrix(d: int, seed: int = 0, top: int = 512) -> torch.Tensor:
    """U diag(1/i) Uᵀ over a random orthonormal U (d × top) plus a diagonal floor below λ_top."""
    g = torch.Generator().manual_seed(seed)
    top = min(top, d)
    u, _ = torch.linalg.qr(torch.randn(d, top, dtype=torch.float64, generator=g))
    lam = torch.arange(1, top + 1, dtype=torch.float64) ** -1.0
    a = (u * lam) @ u.T
    a.diagonal().add_(torch.rand(d, dtype=torch.float64, generator=g) * lam[-1])
    return a


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_decomposition(sizes, ks, dense_max_dim: int, scipy_max_dim: int, rows: list, save) -> list[dict]:
    """Appends one row per (d, k) to ``rows`` and calls ``save()`` after each (a long run keeps what it has)."""
    import scipy.linalg

    for d in sizes:
        a = decaying_matrix(d, seed=d)
        repeats = 3 if d <= 1536 else 1
        dense_s, dense = (None, None)
        if d <= dense_max_dim:
            print(f"  dense eigh d={d} ...", flush=True)
            dense_s, dense = timed(lambda: decompose.top_eigenpairs(a, max(ks), "dense"), repeats)
        for k in ks:
            lanczos_s, got = timed(lambda: decompose.top_eigenpairs(a, k, "lanczos"), repeats)
            row = {"d": d, "k": k, "dense_s": dense_s, "lanczos_s": lanczos_s, "lanczos_method": got.method,
                   "speedup_dense_over_lanczos": dense_s / lanczos_s if dense_s else None,
                   "auto": decompose.choose_method(d, k)}
            if dense is not None:
                cos = (dense.vectors[:k] * got.vectors).sum(1)
                row["min_signed_cos_vs_dense"] = float(cos.min())
                row["max_rel_eigenvalue_err"] = float(((got.values - dense.values[:k]) / dense.values[:k]).abs().max())
            if d <= scipy_max_dim:
                row["scipy_subset_eigh_s"], _ = timed(
                    lambda: scipy.linalg.eigh(a.numpy(), subset_by_index=[d - k, d - 1], driver="evr"), repeats)
            rows.append(row)
            save()
            print("  ", json.dumps(row), flush=True)
        del a, dense
    return rows


def agreement(ours: dict, theirs: dict, order: list[str]) -> dict:
    """Share of modules with equal ranks; mean/min |cos| over the components both have (row by row)."""
    equal = [m for m in order if ours[m].shape[0] == theirs[m].shape[0]]
    cosines = []
    for m in order:
        k = min(ours[m].shape[0], theirs[m].shape[0])
        if k:
            cosines += (ours[m][:k].double() * theirs[m][:k].double()).sum(1).abs().tolist()
    return {"ranks_equal_share": len(equal) / len(order), "ranks_equal": len(equal), "modules": len(order),
            "mean_abs_cos": sum(cosines) / len(cosines), "min_abs_cos": min(cosines), "components_compared": len(cosines),
            "rank_abs_diff_total": sum(abs(ours[m].shape[0] - theirs[m].shape[0]) for m in order)}


def peft_eva(model, batches, r: int, rho: float) -> tuple[float, dict]:
    from peft import EvaConfig, LoraConfig, get_peft_model
    from peft.tuners.lora.eva import get_eva_state_dict

    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights="eva",
                        eva_config=EvaConfig(rho=rho, use_label_mask=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(model), config, low_cpu_mem_usage=True)
        t = time.perf_counter()
        state = get_eva_state_dict(peft_model, batches, show_progress_bar=False)
        seconds = time.perf_counter() - t
    del peft_model
    return seconds, {k.removeprefix("base_model.model."): v for k, v in state.items()}


def ours_eva(model, batches, r: int, rho: float, solver: str = "auto") -> tuple[dict, object]:
    import sensitivity_lora

    t0 = time.perf_counter()
    stats = sensitivity_lora.calibrate(model, batches, hessian="full", progress=False)
    t1 = time.perf_counter()
    groups = group_sums_from_statistics(stats)
    result = eva_init(groups, r, rho, order=list(stats.dims), solver=solver)
    t2 = time.perf_counter()
    return {"calibrate_s": t1 - t0, "eva_init_s": t2 - t1, "total_s": t2 - t0}, (stats, groups, result)


def bench_smollm2(r: int, rho: float, n_texts: int = 32, batch_size: int = 8) -> dict:
    from sensitivity_lora.data import calibration_batches, load_texts
    from sensitivity_lora.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(None)
    texts = load_texts(None, max_samples=n_texts, shuffle_seed=0)
    batches = calibration_batches(texts, tokenizer, seq_len=128, batch_size=batch_size)
    reverse = batches[::-1]
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    print(f"  SmolLM2: {len(batches)} batches, {tokens} tokens", flush=True)

    # warm-up forward so neither side pays the first-call costs
    with torch.no_grad():
        model(**batches[0])

    # ours is timed right before and right after PEFT (the machine is shared: the load can change
    # during PEFT's long run); the ratio uses the slower of the two
    load = {"start": os.getloadavg()[0]}
    print("  ours ...", flush=True)
    ours_t, (stats, groups, result) = ours_eva(model, batches, r, rho)
    order = list(stats.dims)
    print("  ", ours_t, flush=True)
    print("  PEFT EVA ...", flush=True)
    load["before_peft"] = os.getloadavg()[0]
    peft_s, theirs = peft_eva(model, batches, r, rho)
    load["after_peft"] = os.getloadavg()[0]
    print(f"   PEFT {peft_s:.1f} s", flush=True)
    ours_after_t, _ = ours_eva(model, batches, r, rho)
    print("  ", ours_after_t, flush=True)
    print("  PEFT EVA, batches reversed ...", flush=True)
    peft_rev_s, theirs_rev = peft_eva(model, reverse, r, rho)
    load["after_peft_reversed"] = os.getloadavg()[0]
    print(f"   PEFT reversed {peft_rev_s:.1f} s", flush=True)
    ours_rev_t, (_, _, result_rev) = ours_eva(model, reverse, r, rho)

    # the decomposition alone on the real covariances, each solver
    solver_times = {}
    for solver in ("dense", "lanczos", "block"):
        t = time.perf_counter()
        other = eva_init(groups, r, rho, order=order, solver=solver)
        solver_times[solver] = {"eva_init_s": time.perf_counter() - t,
                                "solvers_used": sorted(set(other.solvers.values())),
                                "same_ranks_as_auto": other.ranks == result.ranks,
                                "agreement_with_auto": agreement(other.components, result.components, order)}

    dims_by_group = {name: g.xtx.shape[0] for name, g in groups.items()}
    members = {name: list(g.members) for name, g in groups.items()}
    ranks = {"ours": dict(result.ranks), "peft": {m: int(theirs[m].shape[0]) for m in order},
             "peft_reversed": {m: int(theirs_rev[m].shape[0]) for m in order}}
    return {
        "model": "SmolLM2-135M (sensitivity_lora.models.load_model_and_tokenizer(None))",
        "batches": len(batches), "batch_size": batch_size, "seq_len": 128, "tokens": tokens,
        "r": r, "rho": rho, "modules": len(order), "input_groups": len(groups),
        "group_widths": {str(d): sum(1 for v in dims_by_group.values() if v == d) for d in sorted(set(dims_by_group.values()))},
        "peft_get_eva_state_dict_s": peft_s, "peft_reversed_s": peft_rev_s,
        "ours": ours_t, "ours_after_peft": ours_after_t, "ours_reversed": ours_rev_t,
        "ours_over_peft_time": max(ours_t["total_s"], ours_after_t["total_s"]) / peft_s,
        "load_average_1min": load,
        "ours_vs_peft": agreement(result.components, theirs, order),
        "peft_vs_peft_reversed": agreement(theirs, theirs_rev, order),
        "ours_vs_peft_reversed": agreement(result.components, theirs_rev, order),
        "ours_vs_ours_reversed": agreement(result.components, result_rev.components, order),
        "solver_on_real_covariances": solver_times,
        "budget": result.budget, "rank_sum_ours": sum(result.ranks.values()),
        "rank_sum_peft": sum(v.shape[0] for v in theirs.values()),
        "modules_rank0_ours": sum(1 for v in result.ranks.values() if v == 0),
        "modules_rank0_peft": sum(1 for v in theirs.values() if v.shape[0] == 0),
        "group_rank_multisets_equal": {
            "ours_vs_peft": group_agreement(ranks["ours"], ranks["peft"], members),
            "peft_vs_peft_reversed": group_agreement(ranks["peft"], ranks["peft_reversed"], members)},
        "mean_rank_by_type": {who: mean_by_type(r_) for who, r_ in ranks.items()},
        "ranks": ranks,
    }


def group_agreement(a: dict, b: dict, members: dict) -> float:
    """Share of input groups whose members' ranks are the same multiset (ties inside a group set aside)."""
    same = sum(sorted(a[m] for m in ms) == sorted(b[m] for m in ms) for ms in members.values())
    return same / len(members)


def mean_by_type(ranks: dict) -> dict:
    kinds: dict[str, list[int]] = {}
    for name, rank in ranks.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(rank)
    return {kind: sum(v) / len(v) for kind, v in kinds.items()}


def environment() -> dict:
    import numpy
    import peft
    import scipy
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
            "cpu": cpu, "torch_threads": torch.get_num_threads(), "os_cpus": os.cpu_count(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "torch": torch.__version__, "numpy": numpy.__version__, "scipy": scipy.__version__,
            "peft": peft.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "init.json"))
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 576, 1536, 4096, 14336])
    p.add_argument("--ks", type=int, nargs="+", default=[16, 32])
    p.add_argument("--dense-max-dim", type=int, default=14336, help="skip the dense eigh above this size")
    p.add_argument("--scipy-max-dim", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--rho", type=float, default=2.0)
    p.add_argument("--texts", type=int, default=32, help="calibration texts for the SmolLM2 part")
    p.add_argument("--batch-size", type=int, default=8, help="texts per calibration batch (PEFT's EVA updates once per batch)")
    p.add_argument("--skip-decomposition", action="store_true")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--update", action="store_true", help="keep the other section of an existing --out file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.out)
    out = json.loads(path.read_text()) if args.update and path.exists() else {}
    if "environment" in out:  # a file from a single run: its settings become that run's entry
        out.setdefault("runs", {})["all"] = {"environment": out.pop("environment"), "command": out.pop("command", None)}
    command = " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])
    section = "model" if args.skip_decomposition else "decomposition" if args.skip_model else "all"
    out.setdefault("runs", {})[section] = {"environment": environment(), "command": command}
    path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(path)

    if not args.skip_model:
        print("(ii) SmolLM2: PEFT EVA vs statistics", flush=True)
        out["smollm2"] = bench_smollm2(args.r, args.rho, args.texts, args.batch_size)
        save()
    if not args.skip_decomposition:
        print("(i) decomposition", flush=True)
        out["decomposition"] = []
        bench_decomposition(args.sizes, args.ks, args.dense_max_dim, args.scipy_max_dim, out["decomposition"], save)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
