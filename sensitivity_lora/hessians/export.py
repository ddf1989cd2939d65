"""``export_hessians``: calibrate and write one Hessian file per input group (the Python form of
``sensitivity-lora hessians``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from ..calibration.distributed import rank_and_world
from ..calibration.run import block_statistics
from .format import HessianWriter


def export_hessians(model: torch.nn.Module, batches: Iterable, out_dir: str | os.PathLike,
                    target_modules: str | Sequence[str] | None = None, hessian: str = "full",
                    backend: str | None = None, *, streaming: bool = True, distributed: bool = False,
                    resume: bool = False, device: torch.device | str | None = None,
                    cache_device: torch.device | str | None = None, progress: bool = True,
                    settings: Mapping | None = None) -> Path:
    """Calibrate ``model`` on ``batches`` and write one Hessian file per input group into ``out_dir``.

    With ``streaming`` (default) blocks are processed one at a time and each block's
    Hessians are written and freed before the next; ``resume`` continues an interrupted
    export (the folder doubles as the checkpoint). ``distributed``: under
    torch.distributed, every rank calibrates its shard, the sums are all-reduced, rank 0 writes.
    """
    import torch.distributed as dist

    out_dir = Path(out_dir)
    rank, world = rank_and_world() if distributed else (0, 1)
    record = {**dict(settings or {}), **({"world_size": world} if world > 1 else {})}
    writer = HessianWriter(out_dir, record) if rank == 0 else None
    blocks = block_statistics(model, batches, target_modules, hessian, backend, streaming=streaming,
                              distributed=distributed, progress=progress, device=device, cache_device=cache_device,
                              checkpoint_dir=str(out_dir / "checkpoint") if (streaming and resume) else None,
                              checkpoint_store=False)
    for block in blocks:
        if writer is not None and not block.from_checkpoint:
            writer.write(block.stats.groups.values(), block.stats.dims)
        block.stats = None  # free this block's Hessians before the next block runs
    if world > 1:
        dist.barrier()
    return out_dir
