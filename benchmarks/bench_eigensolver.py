"""Top-k eigenpairs at an 8B model's widths on CPU: the block Krylov solver against dense eigh and ARPACK.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_eigensolver.py              # torch's threads
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_eigensolver.py --threads 1
    python benchmarks/bench_eigensolver.py --device cuda --json OUT.json  # the GPU check's stage: no ARPACK

Matrices: fp32 statistics like a calibration's, S = Xᵀ X / n over n = 4096 rows drawn from a
realistic decaying spectrum (a few outlier directions, then λ_i ∝ i^-0.75 over 1024 directions — λ₁₆/λ₂₅ ≈ 1.4, as in SmolLM2-135M's inputs —
then a floor), d = 4096 (q/k/v, o, gate/up inputs of Llama-3-8B) and 14336 (down_proj's input),
k = 16 and 32 (r̄ = 8 and 16 at ρ = 2). Per (d, k), in one run: the block solver
(``sensitivity_lora.init.decompose``, batch of one), ARPACK Lanczos (``lanczos``) and dense
``torch.linalg.eigh`` (all pairs; at d = 14336 only with ``--dense-all``: about 45 minutes on one
CPU thread, so by default its time is the d = 4096 one scaled by d³, marked as an estimate).
The agreement (largest relative eigenvalue difference, smallest signed cosine) is against the
dense answer where it ran, else against ARPACK.

Also the floating-point work and memory traffic of the block solver, counted from its cycles,
and the H100 time they imply (the slower of work ÷ peak and traffic ÷ bandwidth per product):
the estimate that the GPU check (``scripts/gpu_check.py``, stage ``bench_eig``) measures.
Writes ``benchmarks/results/eigensolver-threads<T>.json`` (RESULTS.md renders it), or with
``--json`` that file only (the rows, for the GPU check).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results_io import LoadMonitor, column, new_run, ratio, write_table  # noqa: E402

from sensitivity_lora.init import block_krylov, decompose  # noqa: E402

TOKENS, SPREAD = 4096, 1024
# H100 SXM (NVIDIA's datasheet): fp32 without tensor cores, fp64 with them, HBM3 bandwidth
H100_FP32_FLOPS, H100_FP64_FLOPS, H100_BYTES_PER_S = 67e12, 67e12, 3.35e12
GPU_EFFICIENCY = 0.5  # share of those peaks the estimate assumes a (d × d)·(d × b) GEMM reaches
LLAMA3_8B_GROUPS = {4096: 96, 14336: 32}  # input groups per width: q/k/v, o, gate/up per layer; down_proj


def statistics(d: int, seed: int, device: torch.device) -> torch.Tensor:
    """S = XᵀX/n in fp32 for X = Z·diag(√λ)·Uᵀ (+ a little isotropic noise), U d × min(SPREAD, d) orthonormal."""
    g = torch.Generator().manual_seed(seed)
    spread = min(SPREAD, d)
    u, _ = torch.linalg.qr(torch.randn(d, spread, generator=g))
    lam = torch.arange(1, spread + 1, dtype=torch.float32) ** -0.75
    lam[:3] = torch.tensor([60.0, 25.0, 12.0])  # outlier directions, as LLM activations have
    z = torch.randn(TOKENS, spread, generator=g) * lam.sqrt()
    noise = 1e-2 * torch.randn(TOKENS, d, generator=g)
    x = z.to(device) @ u.to(device).T + noise.to(device)
    return (x.T @ x) / TOKENS


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def synced(device: torch.device, fn):
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def block_work(d: int, k: int, cycles: int) -> tuple[float, float, float]:
    """(fp32 FLOP, fp64 FLOP, seconds on an H100) of the block solver's products for one matrix."""
    b = block_krylov.block_size(d, k)
    depth = min(block_krylov.DEPTH, d // b - 1)
    m = (depth + 1) * b
    fp32 = (depth + 1) * 2 * d * d * b + 8 * d * m * b  # products, and the basis' projections
    fp64 = 2 * d * d * b + 2 * d * m * m  # the refinement product, and Vᵀ(AV)
    seconds = max(fp32 / H100_FP32_FLOPS, (depth + 1) * 4 * d * d / H100_BYTES_PER_S)
    seconds += max(fp64 / H100_FP64_FLOPS, 8 * d * d / H100_BYTES_PER_S)
    return float(cycles * fp32), float(cycles * fp64), cycles * seconds / GPU_EFFICIENCY


def count_cycles(matrix: torch.Tensor, k: int) -> int:
    cycles = []
    real = block_krylov._refine

    def counting(*args):
        cycles.append(1)
        return real(*args)

    block_krylov._refine = counting
    try:
        decompose.top_eigenpairs(matrix, k, "block")
    finally:
        block_krylov._refine = real
    return len(cycles)


def agreement(got: decompose.Eigenpairs, ref: decompose.Eigenpairs) -> tuple[float, float]:
    k = got.values.shape[0]
    rel = float(((got.values - ref.values[:k]) / ref.values[:k]).abs().max())
    return rel, float((got.vectors * ref.vectors[:k]).sum(1).min())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 14336])
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--dense-all", action="store_true", help="run dense eigh at every size (d = 14336: ~45 min)")
    parser.add_argument("--device", default="cpu", help="where the matrices live (cuda: no ARPACK, a CPU solver)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here instead of benchmarks/results/")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    monitor = LoadMonitor()
    rows, dense_per_cube = [], None
    for d in args.sizes:
        print(f"d = {d}: statistics ...", flush=True)
        matrix = statistics(d, seed=d, device=device)
        dense = None
        if d <= 4096 or args.dense_all:
            dense_s, dense = timed(lambda: synced(device, lambda: decompose.top_eigenpairs(matrix, max(args.ks), "dense")))
            dense_per_cube = dense_s / d**3
            dense_estimated = False
        else:
            dense_s, dense_estimated = (dense_per_cube * d**3 if dense_per_cube else None), True
        for k in args.ks:
            decompose.top_eigenpairs(matrix, k, "block")  # warm-up (cuBLAS/cuSOLVER handles, allocator)
            block_s, block = timed(lambda: synced(device, lambda: decompose.top_eigenpairs(matrix, k, "block")))
            lanczos_s, lanczos = (None, None) if device.type != "cpu" else timed(
                lambda: decompose.top_eigenpairs(matrix, k, "lanczos"))
            reference = dense if dense is not None else lanczos
            rel, cos = agreement(block, reference) if reference is not None else (float("nan"), float("nan"))
            cycles = count_cycles(matrix, k)
            fp32, fp64, gpu_s = block_work(d, k, cycles)
            row = {"d": d, "k": k, "block_s": block_s, "block_method": block.method, "cycles": cycles,
                   "lanczos_s": lanczos_s, "dense_s": dense_s, "dense": "estimate (d³)" if dense_estimated else "measured",
                   "lanczos_over_block": ratio(lanczos_s, block_s), "dense_over_block": ratio(dense_s, block_s),
                   "reference": "dense" if dense is not None else "lanczos", "max_rel_value_diff": rel,
                   "min_signed_cos": cos, "gflop_fp32": fp32 / 1e9, "gflop_fp64": fp64 / 1e9,
                   "h100_estimate_ms": gpu_s * 1e3}
            rows.append(row)
            print("  ", row, flush=True)
        matrix = dense = None  # free before the next size is built
    totals = {}
    for k in args.ks:
        per = {r["d"]: r for r in rows if r["k"] == k}
        if set(LLAMA3_8B_GROUPS) <= set(per):
            totals[k] = {key: sum(n * (per[d][key] or 0.0) for d, n in LLAMA3_8B_GROUPS.items())
                         for key in ("block_s", "lanczos_s", "dense_s", "h100_estimate_ms")}
    if args.json is not None:
        import json

        args.json.write_text(json.dumps({"device": str(device), "threads": threads, "rows": rows,
                                         "llama3_8b_totals": totals}, indent=1))
        return 0
    run = new_run(monitor.stop(), notes=f"torch threads {threads}")
    columns = [column("d", "d", "int"), column("k", "k", "int"), column("block_s", "block s", "s3"),
               column("cycles", "cycles", "int"), column("lanczos_s", "ARPACK s", "s3"),
               column("dense_s", "dense eigh s", "s"), column("dense", "dense", "text"),
               column("lanczos_over_block", "ARPACK ÷ block", "ratio"),
               column("dense_over_block", "dense ÷ block", "ratio"), column("reference", "checked against"),
               column("max_rel_value_diff", "max rel. eigenvalue diff"), column("min_signed_cos", "min signed cos"),
               column("gflop_fp32", "GFLOP fp32", "f1"), column("gflop_fp64", "GFLOP fp64", "f1"),
               column("h100_estimate_ms", "H100 estimate ms", "f1")]
    for row in rows:
        row["max_rel_value_diff"] = f"{row['max_rel_value_diff']:.1e}"
        row["min_signed_cos"] = f"{row['min_signed_cos']:.6f}"
    write_table(f"eigensolver-threads{threads}", benchmark="bench_eigensolver",
                title=f"Top-k eigenpairs at 8B widths, one matrix, {threads} torch thread(s)", columns=columns,
                rows=[dict(r, run="a") for r in rows], run=run,
                notes=[f"fp32 statistics of {TOKENS} rows with a decaying spectrum over {SPREAD} directions; "
                       "H100 estimate: per product the slower of the counted work at 67 TFLOP/s (fp32, and fp64 "
                       f"tensor cores) and the matrix's traffic at 3.35 TB/s, at {GPU_EFFICIENCY:.0%} efficiency.",
                       *[f"All 128 input groups of Llama-3-8B (96 of width 4096, 32 of 14336), k = {k}: block "
                         f"{t['block_s']:.0f} s, ARPACK {t['lanczos_s']:.0f} s, dense eigh {t['dense_s']:.0f} s "
                         f"on this CPU; {t['h100_estimate_ms'] / 1e3:.2f} s estimated on an H100."
                         for k, t in totals.items()]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
