"""How fast can a library form XᵀX at d = 576 on this CPU? The floor under ``accumulate_xtx``.

Times, against one fp32 MKL GEMM (torch's ``mm``, what ``H.addmm_(x.T, x)`` runs), the library
routines that could produce the upper triangle at fp32 accuracy: scipy's OpenBLAS ``ssyrk``,
MKL's ``ssyrk`` and ``cblas_gemm_bf16bf16f32`` (both exported by libtorch_cpu on x86 Linux),
and upper-triangle band GEMMs through ``torch.mm``. Not a test; numbers go to RESULTS.md.

    OPENBLAS_NUM_THREADS=1 python benchmarks/syrk_floor.py [--d 576] [--threads 1]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
from typing import Callable

import numpy as np
import torch
from scipy.linalg import blas


def median_ms(fn: Callable[[], object], reps: int = 15) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lib = torch_lib()
    d = args.d
    print(f"d = {d}, torch threads = {args.threads}, OPENBLAS_NUM_THREADS = {os.environ.get('OPENBLAS_NUM_THREADS')}")
    for n in (256, 1024, 2048, 4096):
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


if __name__ == "__main__":
    main()
