"""Registers the Triton kernels (``sensitivity_lora.kernels``) as the "triton" backend.

Imported by ``ops`` on demand. Raises ImportError (remembered by ``ops`` as the
reason the backend is unavailable) when triton is missing, or when there is
neither a CUDA device nor the Triton CPU interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

import triton  # noqa: F401  (ImportError here means: no triton backend)

from . import ops


def _load_kernels():
    """``sensitivity_lora.kernels`` when installed; from a source checkout, the top-level kernels/ folder."""
    try:
        return importlib.import_module("sensitivity_lora.kernels")
    except ModuleNotFoundError:
        folder = Path(__file__).resolve().parent.parent / "kernels"
        if not (folder / "__init__.py").exists():
            raise
        spec = importlib.util.spec_from_file_location(
            "sensitivity_lora.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["sensitivity_lora.kernels"] = module
        spec.loader.exec_module(module)
        return module


kernels = _load_kernels()
_launch = importlib.import_module("sensitivity_lora.kernels._launch")

if not torch.cuda.is_available() and not _launch.interpreting():
    raise ImportError("the Triton backend needs a CUDA device, or TRITON_INTERPRET=1 (set before importing triton) for CPU tensors")

_sumsq = importlib.import_module("sensitivity_lora.kernels.sumsq")
_xtx = importlib.import_module("sensitivity_lora.kernels.xtx")
_diag = importlib.import_module("sensitivity_lora.kernels.diag_stats")
_chol = importlib.import_module("sensitivity_lora.kernels.cholesky")

ops.register("accumulate_sumsq", "triton", _sumsq.accumulate_sumsq)
ops.register("accumulate_xtx", "triton", _xtx.accumulate_xtx)
ops.register("diag_stats", "triton", _diag.diag_stats)
ops.register("cholesky_damped", "triton", _chol.cholesky_damped)
