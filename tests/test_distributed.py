"""Data-parallel calibration: 2 gloo processes on 127.0.0.1 give the statistics and allocation of 1 process."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import random_batches, tiny_llama
from sensitivity_lora.calibration.one_pass import calibrate
from sensitivity_lora.hessians import load_hessians


pytestmark = [pytest.mark.filterwarnings("ignore:sensitivity_lora._C is not built"),
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available in this build")]

N_BATCHES = 5  # uneven shards over 2 ranks: 3 and 2 batches
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body(out: Path) -> None:
    """What every rank runs (under mp.spawn or torchrun): export, and allocate streamed and one-pass."""
    from sensitivity_lora import compute_allocation, export_hessians, init_from_env
    from sensitivity_lora.calibration.distributed import rank_and_world

    torch.set_num_threads(1)
    assert init_from_env(backend="gloo", timeout_s=TIMEOUT_S)
    rank, world = rank_and_world()
    model, batches = tiny_llama(), random_batches(N_BATCHES, seed=3)
    export_hessians(model, batches, out / "hessians", hessian="full", distributed=True, progress=False)
    result = {}
    for streaming in (True, False):
        allocation = compute_allocation(model, batches, avg_rank=4, hessian="full", streaming=streaming,
                                        distributed=True, progress=False)
        result[str(streaming)] = allocation.to_dict()
    init = compute_allocation(model, batches, avg_rank=4, init="eva", distributed=True, progress=False)
    result["eva"] = {"ranks": init.ranks(), "weights": {n: a.tolist() for n, a in init.initial_weights.items()}}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    _body(Path(out))


def _check_outputs(out: Path) -> None:
    model, batches = tiny_llama(), random_batches(N_BATCHES, seed=3)
    single = calibrate(model, batches, hessian="full", progress=False)
    exported = load_hessians(out / "hessians", convention="sum", by="group")
    assert list(exported) == list(single.groups)
    for name, g in single.groups.items():
        h = exported[name]
        assert (h.n_tokens, h.n_sequences, h.members) == (g.n_tokens, g.n_sequences, g.members)
        for mine, theirs in ((h.raw_xtx, g.raw_xtx()), (h.raw_sumsq, g.sumsq), (h.raw_sum, g.sum)):
            rel = float((mine - theirs).abs().max() / theirs.abs().max())
            assert rel <= 1e-10, f"{name}: relative difference {rel:.2e}"

    from sensitivity_lora import compute_allocation

    expected = compute_allocation(model, batches, avg_rank=4, hessian="full", progress=False)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1], "the ranks disagree"
    for streaming in ("True", "False"):
        got = ranks[0][streaming]["modules"]
        assert {n: m["rank"] for n, m in got.items()} == expected.ranks()
        for n, m in expected.modules.items():
            assert got[n]["theta"] == pytest.approx(m.theta, rel=1e-10)
        assert ranks[0][streaming]["settings"]["world_size"] == 2
    # the initialisation from all-reduced statistics equals the one-process one (to the sums' rounding)
    single_eva = compute_allocation(model, batches, avg_rank=4, init="eva", progress=False)
    assert ranks[0]["eva"]["ranks"] == single_eva.ranks()
    for n, a in single_eva.initial_weights.items():
        torch.testing.assert_close(torch.tensor(ranks[0]["eva"]["weights"][n], dtype=a.dtype).reshape(a.shape), a,
                                   rtol=1e-5, atol=1e-6)


def test_two_gloo_processes_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    context = mp.start_processes(_spawned, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the 2 processes did not finish within {TIMEOUT_S} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    _check_outputs(tmp_path)


_TORCHRUN_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_distributed import _body
_body(Path(sys.argv[1]))
"""


def test_under_torchrun(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(_TORCHRUN_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, timeout=TIMEOUT_S, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_outputs(tmp_path)


def test_shard_and_structure_errors():
    from sensitivity_lora.calibration.distributed import all_reduce_statistics, shard_batches

    assert shard_batches(list(range(5)), 1, 2) == [1, 3]
    with pytest.raises(ValueError, match="cannot feed 4 processes"):
        shard_batches([1, 2], 0, 4)
    stats = calibrate(tiny_llama(), random_batches(1), progress=False)
    before = {k: g.sumsq.clone() for k, g in stats.groups.items()}
    all_reduce_statistics(stats)  # outside torch.distributed: a no-op
    assert all(torch.equal(g.sumsq, before[k]) for k, g in stats.groups.items())
