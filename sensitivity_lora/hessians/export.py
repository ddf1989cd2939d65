"""``export_hessians``: calibrate and write one Hessian file per input group (the Python form of
``sensitivity-lora hessians``)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from ..calibration.distributed import compute_device, rank_and_world
from ..calibration.run import block_statistics
from ..calibration.targets import resolve_targets
from ..calibration.validate import check_batches, check_device, check_model
from ..errors import OutputError
from ..files import check_path
from ..folders import output_lock
from ..settings import check_flag, check_hessian
from .format import CHECKPOINT_DIR, HessianWriter, check_export_folder
from .storage import DEFAULT_DTYPE, DEFAULT_LAYOUT, check_storage


def export_hessians(model: torch.nn.Module, batches: Iterable, out_dir: str | os.PathLike,
                    target_modules: str | Sequence[str] | None = None, hessian: str = "full",
                    backend: str | None = None, *, streaming: bool = True, distributed: bool = False,
                    resume: bool = False, overwrite: bool = False, device: torch.device | str | None = None,
                    cache_device: torch.device | str | None = None, progress: bool = True,
                    settings: Mapping | None = None, storage_dtype: str = "float64", layout: str = "full") -> Path:
    """Calibrate ``model`` on ``batches`` and write one Hessian file per input group into ``out_dir``.

    With ``streaming`` (default) blocks are processed one at a time and each block's
    Hessians are written and freed before the next, and ``out_dir/checkpoint`` records the
    finished blocks with the run's fingerprint (model weights and config, data, settings,
    package version). A folder that already holds an export is refused unless ``resume``
    (continue it: only the same run is accepted, anything else is refused naming what
    differs) or ``overwrite`` (remove it first). The index says the export is complete only
    at the end; ``load_hessians`` refuses an incomplete one. One run per folder (a lock).
    ``distributed``: under torch.distributed, every rank calibrates its shard, the sums are
    all-reduced, rank 0 writes. Everything is checked before the folder is touched.
    ``storage_dtype`` ("float64" or "float32") and ``layout`` ("full" or "upper"): how Σxxᵀ is stored
    (``hessians.storage``); the reader gives the full fp64 matrix back either way.
    """
    import torch.distributed as dist

    check_hessian(hessian)
    check_path("out_dir", out_dir)
    for name, flag in (("streaming", streaming), ("distributed", distributed), ("resume", resume),
                       ("overwrite", overwrite), ("progress", progress)):
        check_flag(name, flag)
    check_storage(storage_dtype, layout)
    check_device(device), check_device(cache_device, "cache_device")
    check_model(model)
    resolve_targets(model, target_modules)
    batches = check_batches(model, batches)
    out_dir = Path(out_dir)
    check_export_folder(out_dir, resume, overwrite)  # before anything is computed
    rank, world = rank_and_world() if distributed else (0, 1)
    storage = {"storage_dtype": storage_dtype, "layout": layout}
    # recorded only when not the default, so that resuming an export begun before these options existed still works
    record = {**dict(settings or {}), **({"world_size": world} if world > 1 else {}),
              **(storage if (storage_dtype, layout) != (DEFAULT_DTYPE, DEFAULT_LAYOUT) else {})}
    with output_lock(out_dir, "export folder") if rank == 0 else contextlib.nullcontext():
        writer, failure = None, None
        if rank == 0:
            try:
                writer = HessianWriter(out_dir, record, resume=resume, overwrite=overwrite, **storage)
            except BaseException as exc:  # the other ranks must hear of it, or they wait for rank 0 forever
                failure = exc
        if world > 1:
            flag = torch.tensor([1 if failure is not None else 0], device=compute_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if failure is None and int(flag) != 0:
                raise OutputError(f"rank 0 could not use the export folder {out_dir} (see its error)")
        if failure is not None:
            raise failure
        blocks = block_statistics(model, batches, target_modules, hessian, backend, streaming=streaming,
                                  distributed=distributed, progress=progress, device=device,
                                  cache_device=cache_device,
                                  checkpoint_dir=str(out_dir / CHECKPOINT_DIR) if streaming else None,
                                  checkpoint_store=False, fingerprint_extra=record)
        for block in blocks:
            if writer is not None and not block.from_checkpoint:
                writer.write(block.stats.groups.values(), block.stats.dims)
            block.stats = None  # free this block's Hessians before the next block runs
        if writer is not None:
            writer.finish()
    if world > 1:
        dist.barrier()
    return out_dir
