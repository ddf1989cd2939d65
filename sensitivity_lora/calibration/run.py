"""The one way calibration runs: one pass or block by block, in one process or data-parallel, resumable."""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .checkpoint import BlockCheckpoint
from .distributed import SharedCheckpoint, all_reduce_statistics, rank_and_world, shard_batches
from .streaming import BlockStatistics, iter_block_statistics


def block_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    target_modules: str | Sequence[str] | None = None,
    hessian: str = "diag",
    backend: str | None = None,
    *,
    streaming: bool = True,
    distributed: bool = False,
    checkpoint_dir: str | None = None,
    checkpoint_store: bool = True,
    device: torch.device | str | None = None,
    cache_device: torch.device | str | None = None,
    progress: bool = True,
    fingerprint_extra: Mapping[str, Any] | None = None,
    sequential: bool = False,
) -> Iterator[BlockStatistics]:
    """Finalised statistics block by block (``streaming``) or as one part for the whole model.

    distributed: under torch.distributed, this rank takes its shard of ``batches`` (the same
      list on every rank) and every block's sums are all-reduced, so each rank gets the
      statistics of all the data; rank 0 writes the checkpoint, and only it shows progress.
    checkpoint_dir: record finished blocks there and resume from them (``checkpoint_store``:
      also store their statistics; off for exports, whose own files hold them). A folder
      written by a run with other model weights, data or settings is refused
      (``fingerprint_extra``: the caller's settings, recorded and compared too).
    sequential: the consumer may change each block before its outputs feed the next block
      (``iter_block_statistics``; GPTQ's sequential quantisation).
    """
    rank, world = rank_and_world() if distributed else (0, 1)
    reduce = None
    if world > 1:
        batches = shard_batches(batches, rank, world)
        reduce = all_reduce_statistics
    checkpoint = None
    if checkpoint_dir is not None:
        kind = SharedCheckpoint if world > 1 else BlockCheckpoint
        checkpoint = kind(checkpoint_dir, store=checkpoint_store)
    return iter_block_statistics(model, batches, target_modules, hessian, backend, streaming=streaming,
                                 device=device, cache_device=cache_device, checkpoint=checkpoint, reduce=reduce,
                                 progress=progress and rank == 0, fingerprint_extra=fingerprint_extra,
                                 sequential=sequential)
