"""Data-parallel calibration on torch.distributed (torchrun, accelerate launch).

Each rank calibrates on its shard of the batches (``batches[rank::world]``);
the raw sums are all-reduced in fp64 (block by block when streaming), so every
rank ends with the statistics of the whole data set, and the same allocation;
only rank 0 writes files. NCCL on GPUs, gloo on CPUs.

    torchrun --nproc_per_node 4 my_script.py      # my_script calls:
    from sensitivity_lora import compute_allocation, init_from_env
    init_from_env()
    allocation = compute_allocation(model, batches, avg_rank=8, distributed=True)   # every rank: all batches
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist

from ..errors import DistributedSetupError
from .checkpoint import BlockCheckpoint
from .statistics import CalibrationStatistics


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
            raise DistributedSetupError(f"WORLD_SIZE={world} but {var} is not set; start the processes with torchrun "
                               "or accelerate launch, which set it")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


# set by torchrun (torch.distributed.run) for every process it starts; accelerate launch sets ACCELERATE_*
LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def single_process_warning(environ: Mapping[str, str] | None = None) -> str | None:
    """Why only one process runs although a launcher started this one, or None.

    torchrun and accelerate launch leave their variables in the environment; with WORLD_SIZE
    missing or 1 (``torchrun --nproc_per_node 1``, or ``accelerate launch --cpu --num_processes N``,
    which starts one process unless MPI runs it) :func:`init_from_env` runs single-process.
    Only reads the environment: nothing about the process group changes.
    """
    env = os.environ if environ is None else environ
    torch_vars = [v for v in LAUNCHER_VARS if v in env]
    accelerate_vars = sorted(v for v in env if v.startswith("ACCELERATE_"))
    world = env.get("WORLD_SIZE")
    if not (torch_vars or accelerate_vars) or world not in (None, "", "1"):
        return None
    launcher, var = ("accelerate launch", accelerate_vars[0]) if accelerate_vars else ("torchrun", torch_vars[0])
    return (f"{launcher} started this process ({var} is set) but WORLD_SIZE is "
            f"{'not set' if world is None else world}: only one process runs. "
            "For N processes: torchrun --nproc_per_node N -m sensitivity_lora ..., or "
            "accelerate launch --multi_gpu --num_processes N -m sensitivity_lora ... "
            "(accelerate's --cpu starts a single process unless it is given --mpirun_hostfile)")


def compute_device() -> torch.device:
    """The device this rank should calibrate on (its GPU under NCCL, else the CPU)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
    device = compute_device()
    key = torch.tensor([_structure_key(stats), -_structure_key(stats)], dtype=torch.int64, device=device)
    dist.all_reduce(key, op=dist.ReduceOp.MAX, group=group)
    if int(key[0]) != _structure_key(stats) or int(key[1]) != -_structure_key(stats):
        raise DistributedSetupError("the ranks found different input groups or target modules; every rank must run "
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


class SharedCheckpoint(BlockCheckpoint):
    """A checkpoint of a distributed run: rank 0 writes, all ranks agree on the data and the finished blocks.

    The folder must be on a filesystem all ranks see (rank 0's files are read back on resume).
    """

    def __init__(self, directory: str | os.PathLike, store: bool = True) -> None:
        super().__init__(directory, store=store, writable=rank_and_world()[0] == 0)

    def open(self, fingerprint: Mapping) -> list[int]:
        fingerprint = dict(fingerprint)
        rank, world = rank_and_world()
        device = compute_device()
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
