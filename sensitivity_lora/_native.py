"""The compiled backends: registers ``sensitivity_lora._C``'s ops in the op table.

Importing this module imports the extension (which registers the operators
``torch.ops.sensitivity_lora.*`` with the dispatcher) and adds thin wrappers,
with the reference's Python signatures and defaults, as the ``cpu`` backend
and, when the extension was built with CUDA kernels, the ``cuda`` backend.
If the extension is missing this import fails and ``ops`` falls back to the
reference with one warning.
"""
from __future__ import annotations

import functools

import torch

from . import _C  # noqa: F401  (loading the library registers the operators)
from . import ops
from .reference import NotPositiveDefiniteError

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


@functools.cache
def register() -> None:
    """Add every op the extension provides to the op table (once)."""
    for name, fn in _WRAPPERS.items():
        if has_kernel(name, "CPU"):
            ops.register(name, "cpu", fn)
        if has_kernel(name, "CUDA"):
            ops.register(name, "cuda", fn)


register()
