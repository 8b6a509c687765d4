"""TorchCommunicator's collectives give torch's results on 1, 2 and 4 gloo processes,
log what they did, and start from torchrun's environment, an existing group or nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed import ReduceOp

from ds.core.comm import Communicator, TorchCollectiveHandle, init_distributed
from ds.core.testing import run_distributed


def _exercise_collectives(preinitialised: bool) -> dict[str, Any]:
    if preinitialised:
        dist.init_process_group("gloo")
    comm = init_distributed(timeout_seconds=60, log_collectives=True)
    r, w = comm.rank, comm.world_size
    out: dict[str, Any] = {"is_communicator": isinstance(comm, Communicator), "device": str(comm.device)}

    summed = torch.tensor([r + 1.0, 2.0])
    comm.all_reduce(summed)
    averaged = torch.tensor([float(r)])
    comm.all_reduce(averaged, op=ReduceOp.AVG)
    largest = torch.tensor([float(r)])
    comm.all_reduce(largest, op=ReduceOp.MAX)
    out["all_reduce"] = (summed.tolist(), averaged.item(), largest.item())

    scattered = torch.empty(2)
    comm.reduce_scatter_tensor(scattered, torch.arange(2.0 * w) * (r + 1))
    out["reduce_scatter"] = scattered.tolist()

    gathered = torch.empty(2 * w)
    handle = comm.all_gather_into_tensor(gathered, torch.tensor([r, 10.0 * r]), async_op=True)
    assert isinstance(handle, TorchCollectiveHandle)
    comm.wait(handle)
    out["all_gather"] = gathered.tolist()

    exchanged = torch.empty(w)
    comm.all_to_all_single(exchanged, torch.tensor([100.0 * r + j for j in range(w)]))
    out["all_to_all"] = exchanged.tolist()
    # Uneven: rank r sends r + 1 rows to every rank, so it receives j + 1 rows from rank j.
    uneven = torch.empty(sum(j + 1 for j in range(w)))
    comm.all_to_all_single(
        uneven,
        torch.tensor([100.0 * r + j for j in range(w) for _ in range(r + 1)]),
        output_split_sizes=[j + 1 for j in range(w)],
        input_split_sizes=[r + 1] * w,
    )
    out["all_to_all_uneven"] = uneven.tolist()

    broadcasted = torch.tensor([float(r)])
    comm.broadcast(broadcasted, src=w - 1)
    out["broadcast"] = broadcasted.item()

    pending = comm.all_reduce(torch.ones(4), async_op=True)
    assert pending is not None
    pending.wait()
    out["async_completed"] = pending.is_completed()
    comm.barrier()

    pair = dist.new_group([0, 1], group_desc="pair")  # every rank creates it, members use it
    if r < 2:
        comm.all_reduce(torch.ones(1), group=pair)

    log = comm.collective_log
    assert log is not None
    out["records"] = [(x.op, x.group, x.sequence, x.nbytes, x.seconds is not None) for x in log.records]
    out["summary"] = {op: (s.count, s.nbytes) for op, s in comm.collective_summary().items()}
    out["summary_table"] = log.format_summary()

    comm.destroy()
    out["watchdog_alive"] = any(t.name == "ds-comm-watchdog" for t in threading.enumerate())
    out["initialised_after_destroy"] = dist.is_initialized()
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_match_torch_semantics_and_are_logged(world: int) -> None:
    preinitialised = world == 2  # world 2 reuses a group the caller made; world 4 starts its own
    results = run_distributed(_exercise_collectives, world, preinitialised)
    total = world * (world + 1) / 2
    for r, out in enumerate(results):
        assert out["is_communicator"] and out["device"] == "cpu"
        assert out["all_reduce"] == ([total, 2.0 * world], (world - 1) / 2, world - 1)
        assert out["reduce_scatter"] == [total * 2 * r, total * (2 * r + 1)]
        assert out["all_gather"] == [v for k in range(world) for v in (k, 10.0 * k)]
        assert out["all_to_all"] == [100.0 * j + r for j in range(world)]
        assert out["all_to_all_uneven"] == [100.0 * j + r for j in range(world) for _ in range(j + 1)]
        assert out["broadcast"] == world - 1
        assert out["async_completed"]

        world_ops = [
            ("all_reduce", 8), ("all_reduce", 4), ("all_reduce", 4),
            ("reduce_scatter_tensor", 8 * world), ("all_gather_into_tensor", 8 * world),
            ("all_to_all_single", 4 * world), ("all_to_all_single", 4 * world * (r + 1)),
            ("broadcast", 4), ("all_reduce", 16), ("barrier", 0),
        ]
        expected = [(op, "world", seq, nbytes, True) for seq, (op, nbytes) in enumerate(world_ops, 1)]
        if r < 2:
            expected.append(("all_reduce", "pair", 1, 4, True))
        assert out["records"] == expected
        assert out["summary"]["all_reduce"] == (4 + (r < 2), 32 + 4 * (r < 2))
        assert out["summary"]["barrier"] == (1, 0)
        assert "all_to_all_single" in out["summary_table"]

        assert not out["watchdog_alive"]
        assert out["initialised_after_destroy"] == preinitialised  # only its own group is destroyed


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

SINGLE_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, time
    import torch
    from ds.core.comm import init_distributed
    from ds.core.mesh import Mesh

    comm = init_distributed(timeout_seconds=30)
    t = torch.tensor([3.0])
    comm.all_reduce(t)
    gathered = torch.empty(2)
    comm.all_gather_into_tensor(gathered, torch.tensor([1.0, 2.0]))
    comm.barrier()
    mesh = Mesh.build(comm)
    print(json.dumps({
        "rank": comm.rank, "world": comm.world_size, "sum": t.item(), "gathered": gathered.tolist(),
        "sizes": [mesh.size(a) for a in ("dp", "pp", "tp", "sp", "ep")], "dp_ranks": mesh.ranks("dp"),
        "printed_at": time.time(),
    }))
    # No destroy(): leaving without it must not hang on the heartbeat thread.
    """
)


def test_world_size_one_without_any_launcher_environment() -> None:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("SLURM_")}
    proc = subprocess.run(
        [sys.executable, "-c", SINGLE_PROCESS_SCRIPT], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    exited_at = time.time()
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rank"] == 0 and out["world"] == 1
    assert out["sum"] == 3.0 and out["gathered"] == [1.0, 2.0]
    assert out["sizes"] == [1, 1, 1, 1, 1] and out["dp_ranks"] == [0]
    assert exited_at - out["printed_at"] < 10, "the process hung on exit"
