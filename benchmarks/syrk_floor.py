"""How fast can a library form XᵀX at d = 576 on this CPU? The floor under ``accumulate_xtx``.

Times, against one fp32 MKL GEMM (torch's ``mm``, what ``H.addmm_(x.T, x)`` runs), the library
routines that could produce the upper triangle at fp32 accuracy: scipy's OpenBLAS ``ssyrk``,
MKL's ``ssyrk`` and ``cblas_gemm_bf16bf16f32`` (both exported by libtorch_cpu on x86 Linux),
and upper-triangle band GEMMs through ``torch.mm``. Not a test. Writes
``benchmarks/results/syrk_floor.json`` (other sizes: ``syrk_floor-d<D>-threads<T>.json``), from
which ``benchmarks/render_results.py`` renders the table of RESULTS.md. Needs an idle machine.

    OPENBLAS_NUM_THREADS=1 python benchmarks/syrk_floor.py [--d 576] [--threads 1]
    OPENBLAS_NUM_THREADS=1 python benchmarks/syrk_floor.py --tokens 256 --reps 3 --out /tmp/floor   # smoke run
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy.linalg import blas

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import LoadMonitor, column, new_run, write_table  # noqa: E402

TOKENS = (256, 1024, 2048, 4096)
COLUMNS = [column("tokens", "tokens", "int"), column("sgemm_ms", "MKL sgemm ms", "f2"),
           column("sgemm_gflops", "sgemm GF/s", "f0"), column("openblas_ssyrk", "OpenBLAS `ssyrk`", "ratio"),
           column("mkl_ssyrk", "MKL `ssyrk`", "ratio"), column("mkl_band_gemms_64", "MKL band GEMMs (64)", "ratio"),
           column("mkl_band_gemms_96", "MKL band GEMMs (96)", "ratio"),
           column("mkl_bf16_gemm", "MKL bf16→fp32 GEMM", "ratio"),
           column("torch_bf16_mm", "torch bf16 `mm` (bf16 out)", "ratio")]
KEYS = {"openblas ssyrk": "openblas_ssyrk", "mkl ssyrk": "mkl_ssyrk", "mkl band gemms (64)": "mkl_band_gemms_64",
        "mkl band gemms (96)": "mkl_band_gemms_96", "mkl bf16->fp32 gemm": "mkl_bf16_gemm",
        "torch bf16 mm (bf16 out)": "torch_bf16_mm"}
NOTES = ["Each routine's median time over the median of one fp32 MKL `sgemm` of the full d × d square (torch's `mm`, "
         "what `H.addmm_(x.T, x)` runs) on the same tokens; medians of 15 after 2 warm-ups.",
         "MKL's `ssyrk` and `cblas_gemm_bf16bf16f32` are the ones exported by libtorch_cpu on x86 Linux; the band "
         "GEMMs form the upper triangle from `torch.mm` blocks of 64 or 96 columns."]


def median_ms(fn: Callable[[], object], reps: int = 15) -> float:
    reps = REPS or reps
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


REPS = 0  # --reps


def torch_lib() -> ctypes.CDLL:
    return ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))


def mkl_ssyrk(lib: ctypes.CDLL, x: np.ndarray, out: np.ndarray) -> None:
    """out (d × d, column-major lower) = x xᵀ for x column-major d × n, via MKL's Fortran-style ssyrk."""
    d, n = x.shape
    c_int, ref = ctypes.c_int, ctypes.byref
    lib.mkl_blas_ssyrk(b"L", b"N", ref(c_int(d)), ref(c_int(n)), ref(ctypes.c_float(1.0)),
                       ctypes.c_void_p(x.ctypes.data), ref(c_int(d)), ref(ctypes.c_float(0.0)),
                       ctypes.c_void_p(out.ctypes.data), ref(c_int(d)))


def mkl_bf16_gemm(lib: ctypes.CDLL, xb: torch.Tensor, out: torch.Tensor) -> None:
    """out = xbᵀ xb (bf16 in, fp32 out) via MKL's cblas_gemm_bf16bf16f32 (row-major)."""
    n, d = xb.shape
    fn = lib.cblas_gemm_bf16bf16f32
    c_int, c_float, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    fn.argtypes = [c_int] * 6 + [c_float, ptr, c_int, ptr, c_int, c_float, ptr, c_int]
    fn(101, 112, 111, d, d, n, 1.0, xb.data_ptr(), d, xb.data_ptr(), d, 0.0, out.data_ptr(), d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--threads", type=int, default=1, help="torch (MKL) threads")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions per routine")
    parser.add_argument("--out", type=Path, help="folder for the JSON (default: benchmarks/results/)")
    args = parser.parse_args()
    global REPS
    REPS = args.reps
    monitor = LoadMonitor()
    torch.set_num_threads(args.threads)
    lib = torch_lib()
    d = args.d
    print(f"d = {d}, torch threads = {args.threads}, OPENBLAS_NUM_THREADS = {os.environ.get('OPENBLAS_NUM_THREADS')}")
    table = []
    for n in args.tokens:
        x = torch.randn(n, d)
        xf = np.asfortranarray(x.numpy().T)  # the column-major d × n view BLAS wants
        gemm = median_ms(lambda: torch.mm(x.T, x))
        rows = {"openblas ssyrk": median_ms(lambda: blas.ssyrk(1.0, xf))}
        out = np.zeros((d, d), np.float32, order="F")
        rows["mkl ssyrk"] = median_ms(lambda: mkl_ssyrk(lib, xf, out))
        xb, out32 = x.bfloat16(), torch.empty(d, d)
        rows["mkl bf16->fp32 gemm"] = median_ms(lambda: mkl_bf16_gemm(lib, xb, out32))
        rows["torch bf16 mm (bf16 out)"] = median_ms(lambda: torch.mm(xb.T, xb))
        for band in (64, 96):
            outs = [torch.empty(i + band, band) for i in range(0, d, band)]
            rows[f"mkl band gemms ({band})"] = median_ms(
                lambda: [torch.mm(x[:, :i + band].T, x[:, i:i + band], out=outs[j])
                         for j, i in enumerate(range(0, d, band))])
        print(f"n = {n}: fp32 gemm {gemm:.2f} ms ({2 * d * d * n / gemm / 1e6:.0f} GF/s); " + "; ".join(
            f"{name} {ms / gemm:.2f}x" for name, ms in rows.items()))
        table.append({"tokens": n, "sgemm_ms": round(gemm, 4), "sgemm_gflops": round(2 * d * d * n / gemm / 1e6, 1),
                      **{KEYS[name]: round(ms / gemm, 4) for name, ms in rows.items()},
                      "times_ms": {KEYS[name]: round(ms, 4) for name, ms in rows.items()}})
    default = d == 576 and args.threads == 1 and args.tokens == list(TOKENS) and args.reps == 15
    name = "syrk_floor" if default else f"syrk_floor-d{d}-threads{args.threads}"
    notes = f"d = {d}, torch {args.threads} thread(s), OPENBLAS_NUM_THREADS = {os.environ.get('OPENBLAS_NUM_THREADS')}."
    write_table(name, benchmark="syrk_floor", title=f"library routines that could form XᵀX at d = {d}, against one "
                "fp32 GEMM", columns=COLUMNS, rows=table, run=new_run(monitor.stop(), notes=notes), notes=NOTES,
                folder=args.out)


if __name__ == "__main__":
    main()
