"""Small helpers shared by the Triton kernels: where they may run and input checks."""
from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older triton: the env var is the switch
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(*tensors: torch.Tensor | None) -> torch.device:
    """All tensors on one device that Triton can run on; return that device."""
    present = [t for t in tensors if t is not None]
    device = present[0].device
    for t in present[1:]:
        if t.device != device:
            raise ValueError(f"tensors on different devices ({device} and {t.device}); move them to one device")
    if device.type == "cpu" and not interpreting():
        raise ValueError(
            "Triton kernels need CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 "
            "before importing triton, or use the 'reference' or 'cpu' backend"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Triton kernels run on CUDA tensors, got a {device.type} tensor")
    return device


def check_activation(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Validate a (tokens, d) activation and its optional (tokens,) mask.

    Returns the mask as a contiguous uint8 tensor on x's device (1 = token counts), or None.
    """
    if x.dim() != 2:
        raise ValueError(f"expected a (tokens, d) activation, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"activation must be floating point, got {x.dtype}")
    if mask is None:
        return None
    if mask.shape != x.shape[:1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match tokens {x.shape[0]}")
    return mask.to(device=x.device, dtype=torch.bool).contiguous().view(torch.uint8)


def check_accumulator(acc: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if acc.dtype != torch.float64:
        raise ValueError(f"{name} must be float64 (accumulators are fp64), got {acc.dtype}")
    if tuple(acc.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(acc.shape)}, expected {shape}")


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (1 under the interpreter)."""
    if interpreting() or not torch.cuda.is_available():
        return 1
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
