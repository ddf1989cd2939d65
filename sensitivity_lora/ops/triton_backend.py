"""Registers the Triton kernels (``sensitivity_lora.kernels``) as the "triton" backend.

Imported by ``sensitivity_lora.ops`` on demand. Raises ImportError (remembered as the reason the
backend is unavailable) when triton is missing, when the package was not installed (the kernels
are installed as ``sensitivity_lora.kernels``: ``pip install -e .``), or when there is neither a
CUDA device nor the Triton CPU interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch

import triton  # noqa: F401  (ImportError here means: no triton backend)

from ..kernels import _launch, cholesky, diag_stats, sumsq, xtx
from . import registry

if not torch.cuda.is_available() and not _launch.interpreting():
    raise ImportError("the Triton backend needs a CUDA device, or TRITON_INTERPRET=1 (set before importing triton) for CPU tensors")

registry.register("accumulate_sumsq", "triton", sumsq.accumulate_sumsq)
registry.register("accumulate_xtx", "triton", xtx.accumulate_xtx)
registry.register("diag_stats", "triton", diag_stats.diag_stats)
registry.register("cholesky_damped", "triton", cholesky.cholesky_damped)
