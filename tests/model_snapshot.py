"""One helper for the hostile tests: everything about a model a run could change, snapshotted and compared.

``snapshot(model)`` copies (clones) every parameter and buffer with its dtype, device and
requires_grad flag, and records every module's class, identity, train/eval flag, instance
attributes (by identity: an instance-level ``forward`` such as accelerate's hook, flags other
libraries set), every hook dictionary, the children, the config and the grad mode.
``assert_unchanged(before, model)`` says exactly what differs. Independent of the package's own
``ModelState`` (the code under test), so it can catch it out.
"""
from __future__ import annotations

from typing import Any

import torch

_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
          "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
          "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_SKIP = ("_parameters", "_buffers", "_modules", "training") + _HOOKS


def snapshot(model: torch.nn.Module) -> dict[str, Any]:
    params = {name: (p.detach().cpu().clone(), p.dtype, p.device, p.requires_grad, id(p))
              for name, p in model.named_parameters(remove_duplicate=False)}
    buffers = {name: (b.detach().cpu().clone(), b.dtype, b.device)
               for name, b in model.named_buffers(remove_duplicate=False)}
    modules = {}
    for name, m in model.named_modules(remove_duplicate=False):
        d = m.__dict__
        modules[name] = {
            "class": type(m), "id": id(m), "training": m.training,
            "attributes": {k: id(v) for k, v in d.items() if k not in _SKIP},
            "hooks": {k: [(key, id(fn)) for key, fn in d[k].items()] for k in _HOOKS if k in d},
            "children": {k: id(c) for k, c in m._modules.items()},
        }
    config = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else None
    return {"params": params, "buffers": buffers, "modules": modules, "config": config,
            "grad_enabled": torch.is_grad_enabled()}


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    out = []
    for kind in ("params", "buffers"):
        a, b = before[kind], after[kind]
        out += [f"{kind[:-1]} {n} added" for n in b if n not in a]
        out += [f"{kind[:-1]} {n} removed" for n in a if n not in b]
        for n in a:
            if n not in b:
                continue
            (ta, *rest_a), (tb, *rest_b) = a[n], b[n]
            if rest_a != rest_b:
                out.append(f"{kind[:-1]} {n}: (dtype, device, requires_grad, id) {rest_a} → {rest_b}")
            elif not torch.equal(ta, tb):
                out.append(f"{kind[:-1]} {n}: values changed")
    a, b = before["modules"], after["modules"]
    out += [f"module {n} added" for n in b if n not in a]
    out += [f"module {n} removed" for n in a if n not in b]
    for n in a:
        if n in b:
            for key in ("class", "id", "training", "attributes", "hooks", "children"):
                if a[n][key] != b[n][key]:
                    if key == "attributes":
                        keys = sorted(k for k in set(a[n][key]) | set(b[n][key]) if a[n][key].get(k) != b[n][key].get(k))
                        out.append(f"module {n or '<root>'}: attributes {keys} changed")
                    else:
                        out.append(f"module {n or '<root>'}: {key} {a[n][key]} → {b[n][key]}")
    if before["config"] != after["config"]:
        keys = sorted(k for k in set(before["config"]) | set(after["config"])
                      if before["config"].get(k) != after["config"].get(k))
        out.append(f"config changed: {keys}")
    if before["grad_enabled"] != after["grad_enabled"]:
        out.append("grad mode changed")
    return out


def assert_unchanged(before: dict[str, Any], model: torch.nn.Module) -> None:
    diff = differences(before, snapshot(model))
    assert not diff, "the model changed: " + "; ".join(diff[:8])


def folder_bytes(folder) -> dict[str, bytes]:
    """Every visible file under ``folder`` (relative path → bytes); hidden files (locks, staging) left out."""
    from pathlib import Path

    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def hidden_entries(folder) -> list[str]:
    """Hidden entries (staging folders, journals, locks) left in ``folder``."""
    from pathlib import Path

    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))
