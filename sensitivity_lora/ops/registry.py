"""The op table (a leaf: imports nothing of ours): one name per op and its implementations per backend.

Backend modules (``reference``, ``native``, ``triton_backend``) register into it;
``sensitivity_lora.ops`` chooses among them.
"""
from __future__ import annotations

from typing import Callable

OP_NAMES = (
    "accumulate_sumsq",
    "accumulate_xtx",
    "diag_stats",
    "cholesky_damped",
    "cholesky_inverse_diag",
)
BACKENDS = ("reference", "cpu", "cuda", "triton")

TABLE: dict[str, dict[str, Callable]] = {name: {} for name in OP_NAMES}


def register(op: str, backend: str, fn: Callable) -> None:
    """Add ``fn`` as the ``backend`` implementation of ``op`` (used by backend modules)."""
    if op not in TABLE:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OP_NAMES)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    TABLE[op][backend] = fn
