"""A fingerprint of everything a resumed or merged result depends on, and the comparison that names what differs.

A resumed run (a streaming checkpoint, ``hessians --resume``) adds new blocks to statistics
that an earlier run measured; that is right only when both runs saw the same model, data and
settings. The fingerprint holds, as short digests:

- ``model_weights``: every parameter and buffer of the model: name, shape, dtype, the bytes of an
  evenly strided sample of at most ``SAMPLE`` elements, and a checksum of all its bytes (read as
  integers and summed modulo 2⁶⁴: exact and order-free, so the same on every device; a tensor is
  read where it lives and only its sample is copied). A model of the same architecture with other
  weights (another checkpoint, a fine-tuned copy, one changed element) differs;
- ``model_config``: the model's class and config (its path and the transformers version left out);
- ``data``: every calibration batch, byte for byte, and their number;
- the calibration settings (target modules and their shapes, Hessian mode, the resolved kernel
  backend, the caller's extra settings) and the package version.

The allocation settings (method, ρ, ...) are not in it: they are applied to the statistics after
calibration, so a resumed run may change them. Tensors on the meta device (accelerate offload)
contribute only their name, shape and dtype.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .. import ops

SAMPLE = 65536  # elements copied per tensor: SmolLM2-135M's whole digest copies ~15 MB
FORMAT = "2"  # 2: model weights, config, backend and package version added

DESCRIPTIONS = {
    "model_weights": "the model's weights",
    "model_config": "the model's config",
    "model_class": "the model class",
    "dtype": "the model's dtype",
    "data": "the calibration data",
    "n_batches": "the number of calibration batches",
    "world_size": "the number of processes",
    "targets": "the target modules",
    "n_targets": "the number of target modules",
    "dims": "the target modules' shapes",
    "container": "the list of transformer blocks",
    "hessian": "the Hessian mode",
    "backend": "the kernel backend",
    "package_version": "the sensitivity-lora version",
    "fingerprint_format": "the checkpoint format",
    "settings": "the run's settings",
}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _update_tensor(hasher: "hashlib._Hash", name: str, tensor: torch.Tensor) -> None:
    hasher.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    if tensor.device.type == "meta" or tensor.numel() == 0:
        hasher.update(b"no-data")
        return
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLE)
    sample = flat[::step].contiguous().cpu()
    hasher.update(sample.view(torch.uint8).numpy().tobytes())
    # every element, exactly: the bytes as 64-bit integers summed modulo 2⁶⁴ (order-free: the same on every device)
    raw = flat.contiguous().view(torch.uint8)
    whole = raw.numel() // 8 * 8
    try:
        words = raw[:whole].view(torch.int64)
    except RuntimeError:  # a view into a storage at an odd offset: copy it
        words = raw[:whole].clone().view(torch.int64)
    total = int(words.sum()) if whole else 0
    total += int(raw[whole:].to(torch.int64).sum()) if whole < raw.numel() else 0
    hasher.update((total % 2 ** 64).to_bytes(8, "little"))


def weights_digest(model: nn.Module) -> str:
    """A digest of every parameter and buffer (see the module docstring); the same on every device."""
    hasher = hashlib.sha256()
    for name, param in model.named_parameters():
        _update_tensor(hasher, "p:" + name, param)
    for name, buffer in model.named_buffers():
        _update_tensor(hasher, "b:" + name, buffer)
    return hasher.hexdigest()


def config_digest(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return "none"
    values = {k: v for k, v in config.to_dict().items()
              if k not in ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash")}
    return _digest(values)


def resolved_backend(backend: str | None, device: torch.device) -> dict[str, str]:
    """The backend each statistics op runs on here (forced, from the environment, or the automatic choice)."""
    return {op: ops.resolve_backend(op, device, backend) for op in ("accumulate_sumsq", "accumulate_xtx")}


def run_fingerprint(model: nn.Module, names: Sequence[str], dims: Mapping[str, tuple[int, int]], hessian: str,
                    backend: str | None, device: torch.device, data: str, n_batches: int, container: str,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fingerprint of one calibration run (plain JSON values)."""
    from .. import __version__

    first = next(model.parameters(), None)
    fingerprint = {
        "fingerprint_format": FORMAT,
        "package_version": __version__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_config": config_digest(model),
        "model_weights": weights_digest(model),
        "dtype": str(first.dtype) if first is not None else "none",
        "targets": _digest(list(names)),
        "n_targets": len(names),
        "dims": _digest(sorted((n, list(d)) for n, d in dims.items())),
        "container": container,
        "hessian": hessian,
        "backend": resolved_backend(backend, device),
        "data": data,
        "n_batches": n_batches,
    }
    if extra:
        fingerprint["settings"] = json.loads(json.dumps(dict(extra), sort_keys=True, default=str))
    return json.loads(json.dumps(fingerprint))  # normalised: tuples → lists


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words ("the model's weights", "the run's settings (seq_len: 32 → 64)")."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        what = DESCRIPTIONS.get(key, key)
        if a is None:
            out.append(f"{what} (not recorded by the earlier run)")
        elif b is None:
            out.append(f"{what} (recorded by the earlier run only)")
        elif isinstance(a, Mapping) and isinstance(b, Mapping):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            shown = ", ".join(f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in keys[:4])
            out.append(f"{what} ({shown})")
        elif key in ("package_version", "n_batches", "n_targets", "hessian", "dtype", "container",
                     "fingerprint_format", "world_size", "model_class"):
            out.append(f"{what} ({a!r} → {b!r})")
        else:
            out.append(what)
    return out

