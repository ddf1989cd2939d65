"""The compiled backends: registers ``sensitivity_lora._C``'s ops in the op table.

Importing this module imports the extension (which registers the operators
``torch.ops.sensitivity_lora.*`` with the dispatcher) and adds thin wrappers,
with the reference's Python signatures and defaults, as the ``cpu`` backend
and, when the extension was built with CUDA kernels, the ``cuda`` backend.
If the extension is missing this import fails and ``sensitivity_lora.ops`` falls back to the
reference with one warning.

The cpu ``accumulate_xtx`` can use scipy's OpenBLAS SYRK (see :func:`use_external_syrk`); the
wrapper turns it on at its first call, so calling ``torch.ops.sensitivity_lora.accumulate_xtx``
directly before that uses the at::mm path (same results within fp32 rounding).
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch

def _check_build() -> None:
    """Refuse an extension compiled against another torch (its ABI would not match)."""
    try:
        from .._build_info import TORCH_VERSION
    except ImportError:  # a build from before the record existed: nothing to compare
        return
    if TORCH_VERSION.split("+")[0] != torch.__version__.split("+")[0]:
        raise ImportError(f"sensitivity_lora._C was built against torch {TORCH_VERSION} but torch {torch.__version__} "
                          "is installed; rebuild it with `pip install --no-build-isolation .`")


_check_build()

from .. import _C  # noqa: E402,F401  (loading the library registers the operators)
from ..errors import NotPositiveDefiniteError
from . import registry

_LIB = torch.ops.sensitivity_lora
# Prefix of the C++ error raised for an exhausted damping ladder or a
# non-finite Hessian (kNotPositiveDefinite in csrc/cpu/checks.h).
_NPD_PREFIX = "NotPositiveDefiniteError: "


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered a ``dispatch_key`` ("CPU", "CUDA", ...) kernel for ``op``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"sensitivity_lora::{op}", dispatch_key)


def accumulate_sumsq(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None,
                     acc_sum: torch.Tensor | None = None) -> None:
    """acc += Σ_t x_t² (per feature, masked tokens only); optionally acc_sum += Σ_t x_t."""
    _LIB.accumulate_sumsq(acc, x, mask, acc_sum)


def accumulate_xtx(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None,
                   diag: torch.Tensor | None = None) -> None:
    """acc += Σ_t x_t x_tᵀ (upper triangle guaranteed); optionally diag += Σ_t x_t²."""
    if _SYRK_STATE is None:  # first call: look for scipy's OpenBLAS SYRK (importing scipy is slow)
        use_external_syrk(syrk_default())
    _LIB.accumulate_xtx(acc, x, mask, diag)


def diag_stats(diag: torch.Tensor, d_out: int, k: int, alpha: float) -> torch.Tensor:
    """[trace, top-k mean, effective rank] (float64) of diag repeated ``d_out`` times."""
    return _LIB.diag_stats(diag, int(d_out), int(k), float(alpha))


def cholesky_damped(H: torch.Tensor, rel_damp: float = 0.01, max_tries: int = 6,
                    ladder: float = 10.0) -> tuple[torch.Tensor, float, int]:
    """Lower Cholesky factor of H + δ·I with a damping ladder: (L, δ, tries); see the reference."""
    try:
        L, damp, tries = _LIB.cholesky_damped(H, float(rel_damp), int(max_tries), float(ladder))
    except (ValueError, RuntimeError) as exc:
        message = str(exc)
        at = message.find(_NPD_PREFIX)
        if at < 0:
            raise
        raise NotPositiveDefiniteError(message[at + len(_NPD_PREFIX):].strip()) from None
    return L, float(damp), int(tries)


def cholesky_inverse_diag(L: torch.Tensor) -> torch.Tensor:
    """diag(H⁻¹) from the lower Cholesky factor L of H."""
    return _LIB.cholesky_inverse_diag(L)


_WRAPPERS = {fn.__name__: fn for fn in (accumulate_sumsq, accumulate_xtx, diag_stats, cholesky_damped,
                                        cholesky_inverse_diag)}


def _capsule_address(capsule: object) -> int:
    """The function pointer held by a Cython ``__pyx_capi__`` capsule."""
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return int(api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule)))


def _openblas_syrk() -> tuple[int, int, int] | None:
    """(ssyrk, sgemm, openblas_set_num_threads_local) of scipy's BLAS, or None.

    Only OpenBLAS qualifies: the C++ side must be able to keep its thread pool out of the way
    (one BLAS thread per OpenMP thread), which needs the thread-count setter.
    """
    try:
        from scipy.linalg import cython_blas
    except ImportError:
        return None
    try:
        library = ctypes.CDLL(cython_blas.__file__)  # dlsym on it also searches its dependencies
    except OSError:
        return None
    for name in ("scipy_openblas_set_num_threads_local", "openblas_set_num_threads_local"):
        setter = getattr(library, name, None)
        if setter is not None:
            break
    else:
        return None
    capi = cython_blas.__pyx_capi__
    return (_capsule_address(capi["ssyrk"]), _capsule_address(capi["sgemm"]),
            int(ctypes.cast(setter, ctypes.c_void_p).value))


_SYRK_STATE: bool | None = None  # None: not configured yet (done on the first accumulate_xtx call)


def syrk_default() -> bool:
    """The default of :func:`use_external_syrk`: on unless ``SENSITIVITY_LORA_XTX_SYRK=0``."""
    return os.environ.get("SENSITIVITY_LORA_XTX_SYRK", "1").strip().lower() not in ("0", "false", "no", "off")


def use_external_syrk(enabled: bool = True) -> bool:
    """Whether the cpu ``accumulate_xtx`` uses scipy's OpenBLAS SYRK for fp32 products; returns if it does.

    On by default when scipy's BLAS is OpenBLAS (a SYRK does half a GEMM's flops; torch's MKL exports
    none). Off, or without it, the upper-triangle blocks are at::mm GEMMs. Process-wide setting;
    during each call OpenBLAS's own thread count is 1 (torch's threads split the work), then restored.
    """
    global _SYRK_STATE
    found = _openblas_syrk() if enabled else None
    _C._set_external_syrk(*(found or (0, 0, 0)))
    _SYRK_STATE = found is not None
    return _SYRK_STATE


@functools.cache
def register() -> None:
    """Add every op the extension provides to the op table (once)."""
    for name, fn in _WRAPPERS.items():
        if has_kernel(name, "CPU"):
            registry.register(name, "cpu", fn)
        if has_kernel(name, "CUDA"):
            registry.register(name, "cuda", fn)


register()
