"""The op table: one name per op, its implementations per backend, and the
choice of backend.

Backends: ``reference`` (pure PyTorch, always there), ``cpu`` (the compiled
extension ``sensitivity_lora._C``, CPU tensors), ``cuda`` (the compiled CUDA
extension, CUDA tensors), ``triton`` (kernels in ``sensitivity_lora.kernels``).
The table itself is
``registry``; the backend modules register into it when first needed.

Choice, first match wins: the ``backend=`` argument of :func:`get_op`, the
``SENSITIVITY_LORA_BACKEND`` environment variable, then automatic (compiled
extension for the tensor's device, then Triton on CUDA, then reference).
A forced backend that is not available raises; automatic choice never does.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

from ..errors import BackendUnavailableError
from . import reference
from .registry import BACKENDS, OP_NAMES, TABLE as _TABLE, register

ENV_VAR = "SENSITIVITY_LORA_BACKEND"
for _name in OP_NAMES:
    register(_name, "reference", getattr(reference, _name))
_LOADED: set[str] = set()
_WARNED = False


def _load_backend(backend: str) -> None:
    """Import the module that registers ``backend``'s ops (once; failures are remembered)."""
    if backend in _LOADED or backend == "reference":
        return
    _LOADED.add(backend)
    try:
        if backend in ("cpu", "cuda"):
            from . import native  # noqa: F401  (registers what the extension provides)
        elif backend == "triton":
            from . import triton_backend  # noqa: F401
    except Exception as exc:  # missing extension / triton: the reference still works
        _LOAD_ERRORS[backend] = f"{type(exc).__name__}: {exc}"


_LOAD_ERRORS: dict[str, str] = {}


def available(op: str, backend: str) -> bool:
    _load_backend(backend)
    return backend in _TABLE[op]


def unavailable_reason(op: str, backend: str) -> str:
    """Why ``backend`` has no ``op`` here (for skip messages and errors)."""
    _load_backend(backend)
    if backend in _TABLE[op]:
        return ""
    return _LOAD_ERRORS.get(backend, f"backend {backend!r} does not implement {op!r} in this build")


def _auto(op: str, device: torch.device) -> str:
    global _WARNED
    # compiled kernels exist for CPU and CUDA tensors only; anything else (mps, xpu, ...) uses the reference
    order = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}.get(device.type, ())
    for backend in order:
        if available(op, backend):
            return backend
    if device.type == "cpu" and not _WARNED:
        _WARNED = True
        warnings.warn(
            "sensitivity_lora._C is not built; using the pure-PyTorch reference ops "
            f"({unavailable_reason(op, 'cpu')}). Reinstall with "
            "`pip install --no-build-isolation .` for the fast kernels.",
            stacklevel=3,
        )
    return "reference"


def resolve_backend(op: str, device: torch.device | str = "cpu", backend: str | None = None) -> str:
    """The backend that will run ``op`` for tensors on ``device``."""
    backend = backend or os.environ.get(ENV_VAR) or "auto"
    if backend == "auto":
        return _auto(op, torch.device(device))
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (from argument or ${ENV_VAR}); choose from auto, {', '.join(BACKENDS)}")
    if not available(op, backend):
        raise BackendUnavailableError(f"backend {backend!r} was requested for {op!r} but is unavailable: {unavailable_reason(op, backend)}")
    return backend


def get_op(op: str, device: torch.device | str = "cpu", backend: str | None = None) -> Callable:
    """The implementation of ``op`` for ``device`` (see module docstring for the choice)."""
    if op not in _TABLE:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OP_NAMES)}")
    return _TABLE[op][resolve_backend(op, device, backend)]
