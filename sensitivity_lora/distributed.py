"""Data-parallel calibration on torch.distributed (torchrun, accelerate launch).

Each rank calibrates on its shard of the batches (``batches[rank::world]``);
the raw sums are all-reduced in fp64 (block by block when streaming), so every
rank ends with the statistics of the whole data set, and the same allocation;
only rank 0 writes files. NCCL on GPUs, gloo on CPUs.

    torchrun --nproc_per_node 4 my_script.py      # my_script calls:
    from sensitivity_lora.distributed import init_from_env, compute_allocation_distributed
    init_from_env()
    allocation = compute_allocation_distributed(model, batches, avg_rank=8)   # every rank: all batches
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from .capture import CalibrationStatistics
from .checkpoint import BlockCheckpoint


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(backend: str | None = None, timeout_s: float = 1800) -> bool:
    """Join the process group that torchrun / accelerate launch describe in the environment.

    Returns True when running distributed (WORLD_SIZE > 1). Backend: NCCL when CUDA
    is available, gloo otherwise (or as given). Under NCCL each rank takes GPU LOCAL_RANK.
    """
    if dist.is_initialized():
        return dist.get_world_size() > 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world} but {var} is not set; start the processes with torchrun "
                               "or accelerate launch, which set it")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def compute_device() -> torch.device:
    """The device this rank should calibrate on (its GPU under NCCL, else the CPU)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _comm_device() -> torch.device:
    return compute_device()


def shard_batches(batches: Iterable, rank: int | None = None, world: int | None = None) -> list:
    """This rank's share of the batches: every world-th batch, starting at ``rank``."""
    if rank is None or world is None:
        rank, world = rank_and_world()
    batches = list(batches)
    if len(batches) < world:
        raise ValueError(f"{len(batches)} calibration batches cannot feed {world} processes; "
                         "use more samples, a smaller batch size, or fewer processes")
    return batches[rank::world]


def _structure_key(stats: CalibrationStatistics) -> int:
    """A 63-bit hash of the group layout; all ranks must agree before their sums can be added."""
    layout = [(name, g.members, g.d_in, g.mode) for name, g in stats.groups.items()]
    return int.from_bytes(hashlib.sha256(json.dumps(layout).encode()).digest()[:8], "little") >> 1


def all_reduce_statistics(stats: CalibrationStatistics, group: Any = None) -> None:
    """Sum every rank's raw sums and counts into ``stats`` in place (fp64). No-op outside torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    device = _comm_device()
    key = torch.tensor([_structure_key(stats), -_structure_key(stats)], dtype=torch.int64, device=device)
    dist.all_reduce(key, op=dist.ReduceOp.MAX, group=group)
    if int(key[0]) != _structure_key(stats) or int(key[1]) != -_structure_key(stats):
        raise RuntimeError("the ranks found different input groups or target modules; every rank must run "
                           "the same model with the same target_modules and hessian mode")
    for g in stats.groups.values():
        for attr in ("sumsq", "sum", "xtx"):
            tensor = getattr(g, attr)
            if tensor is None:
                continue
            shared = tensor.to(device, torch.float64)
            dist.all_reduce(shared, op=dist.ReduceOp.SUM, group=group)
            setattr(g, attr, shared.to(tensor.device))
        g._symmetric = False  # the upper triangles add up; the lower ones need mirroring again
        counts = torch.tensor([g.n_tokens, g.n_sequences], dtype=torch.int64, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        g.n_tokens, g.n_sequences = int(counts[0]), int(counts[1])


class _SharedCheckpoint(BlockCheckpoint):
    """A checkpoint of a distributed run: rank 0 writes, all ranks agree on the data and the finished blocks.

    The folder must be on a filesystem all ranks see (rank 0's files are read back on resume).
    """

    def __init__(self, directory: str | os.PathLike, store: bool = True) -> None:
        super().__init__(directory, store=store, writable=rank_and_world()[0] == 0)

    def open(self, fingerprint: Mapping) -> list[int]:
        fingerprint = dict(fingerprint)
        rank, world = rank_and_world()
        device = _comm_device()
        digest = torch.frombuffer(bytearray(bytes.fromhex(fingerprint["data"])), dtype=torch.uint8).to(device)
        digests = [torch.empty_like(digest) for _ in range(world)]
        dist.all_gather(digests, digest)
        fingerprint["data"] = hashlib.sha256(b"".join(bytes(d.cpu().tolist()) for d in digests)).hexdigest()
        n = torch.tensor([fingerprint["n_batches"]], dtype=torch.int64, device=device)
        dist.all_reduce(n)
        fingerprint["n_batches"], fingerprint["world_size"] = int(n), world
        done = super().open(fingerprint) if rank == 0 else []
        count = torch.tensor([len(done)], dtype=torch.int64, device=device)
        dist.broadcast(count, 0)
        listed = torch.tensor(done or [0] * int(count), dtype=torch.int64, device=device)
        if int(count):
            dist.broadcast(listed, 0)
        self.done = [int(i) for i in listed.tolist()][: int(count)]
        if rank != 0:
            self._manifest = {"fingerprint": fingerprint, "store": self.store, "done": list(self.done)}
        return list(self.done)


def iter_block_statistics_distributed(model: torch.nn.Module, batches: Iterable, target_modules=None,
                                      hessian: str = "diag", backend: str | None = None, *, streaming: bool = True,
                                      checkpoint_dir: str | None = None, checkpoint_store: bool = True,
                                      progress: bool = True, **stream_kwargs):
    """``streaming.iter_block_statistics`` on this rank's shard, each block all-reduced before it is yielded."""
    from .streaming import iter_block_statistics

    rank, world = rank_and_world()
    shard = shard_batches(batches, rank, world)
    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint = _SharedCheckpoint(checkpoint_dir, store=checkpoint_store) if world > 1 else \
            BlockCheckpoint(checkpoint_dir, store=checkpoint_store)
    return iter_block_statistics(model, shard, target_modules, hessian, backend, streaming=streaming,
                                 checkpoint=checkpoint, reduce=all_reduce_statistics,
                                 progress=progress and rank == 0, **stream_kwargs)


def compute_allocation_distributed(model: torch.nn.Module, batches: Iterable, avg_rank: float = 8, *,
                                   target_modules: str | Sequence[str] | None = None, hessian: str = "diag",
                                   backend: str | None = None, streaming: bool = True,
                                   checkpoint_dir: str | None = None, progress: bool = True,
                                   out: str | os.PathLike | None = None, device=None, cache_device=None,
                                   **allocation_kwargs: Any):
    """The allocation of the whole data set, on every rank; rank 0 saves it to ``out`` (a JSON file) if given.

    ``batches``: all batches (the same list on every rank); each rank keeps its shard.
    ``allocation_kwargs``: method, scope, topk, alpha, fusion, r_min, rho, r_max, budget_mode, tiers.
    """
    from .metrics import MetricSettings
    from .pipeline import _check_settings
    from .streaming import allocation_from_blocks

    settings = MetricSettings(**{k: allocation_kwargs[k] for k in ("scope", "topk", "alpha") if k in allocation_kwargs})
    _check_settings(avg_rank, hessian, settings)
    blocks = iter_block_statistics_distributed(model, batches, target_modules, hessian, backend, streaming=streaming,
                                               checkpoint_dir=checkpoint_dir, progress=progress,
                                               device=device, cache_device=cache_device)
    allocation = allocation_from_blocks(blocks, avg_rank, hessian=hessian, backend=backend, **allocation_kwargs)
    allocation.settings["world_size"] = rank_and_world()[1]
    if out is not None and rank_and_world()[0] == 0:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        allocation.save(out)
    return allocation


def export_hessians_distributed(model: torch.nn.Module, batches: Iterable, out_dir: str | os.PathLike,
                                target_modules=None, hessian: str = "full", backend: str | None = None, *,
                                streaming: bool = True, resume: bool = False, progress: bool = True,
                                settings: Mapping | None = None, device=None, cache_device=None) -> Path:
    """``hessian_io.export_hessians`` over all ranks' data; rank 0 writes the files."""
    from .hessian_io import HessianWriter

    out_dir = Path(out_dir)
    rank, world = rank_and_world()
    writer = HessianWriter(out_dir, {**dict(settings or {}), "world_size": world}) if rank == 0 else None
    blocks = iter_block_statistics_distributed(
        model, batches, target_modules, hessian, backend, streaming=streaming,
        checkpoint_dir=str(out_dir / "checkpoint") if (streaming and resume) else None, checkpoint_store=False,
        progress=progress, device=device, cache_device=cache_device)
    for block in blocks:
        if writer is not None and not block.from_checkpoint:
            writer.write(block.stats.groups.values(), block.stats.dims)
        block.stats = None  # free this block's Hessians before the next block runs
    if world > 1:
        dist.barrier()
    return out_dir
