"""Weight offloading for the streaming engine: blocks visit the compute device one at a time."""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn


class StreamingUnsupported(Exception):
    """This model cannot be streamed block by block (the message says why); the caller falls back."""


@contextlib.contextmanager
def on_device(modules: Sequence[nn.Module], device: torch.device | None, write_back: bool = False) -> Iterator[None]:
    """Move ``modules`` to ``device`` for the duration (weight offloading); restore after, also on error.

    ``write_back``: copy the values back into the original tensors (a sequential consumer changed them on
    ``device``) instead of moving new ones home, so the model keeps its own tensor objects."""
    if device is None:
        yield
        return
    homes = []
    try:
        for module in modules:
            home = next((p.device for p in module.parameters()), None)
            # parameters keep their objects across .to() (only .data changes), buffers are replaced
            originals = ([(p, p.data) for p in module.parameters()],
                         [(m, k, b) for m in module.modules() for k, b in m._buffers.items() if b is not None]) \
                if write_back else ([], [])
            homes.append((module, home, originals))
            if home is not None and home != device:
                module.to(device)
        yield
    finally:
        for module, home, originals in homes:
            if home is None or home == device:
                continue
            if not write_back:
                module.to(home)
                continue
            params, buffers = originals
            for param, data in params:  # the values the consumer wrote on ``device``, into the home tensors
                data.copy_(param.data)
                param.data = data
            for owner, key, buffer in buffers:
                buffer.copy_(owner._buffers[key])
                owner._buffers[key] = buffer


def outside_blocks(model: nn.Module, container: str) -> list[nn.Module]:
    """The children on the path to the block list that are not the block list itself (embeddings, norms...)."""
    out, module, path = [], model, container.split(".")
    for depth, part in enumerate(path):
        for name, child in module.named_children():
            if name != part:
                out.append(child)
        if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            raise StreamingUnsupported(f"{'.'.join(path[:depth]) or 'the model'} holds its own parameters; "
                                       "offloading cannot move them")
        module = getattr(module, part)
    return out
