"""A collective's buffers are freed as soon as the caller drops them after waiting.

torch's Work handle keeps a collective's tensors alive until the handle itself dies.
If the communicator (its handle or its watchdog, which polls unfinished collectives
about once a second) kept the Work after the wait, every temporary buffer handed to a
collective (ZeRO's reduce-scatter buckets, all-gather outputs) would outlive its use by
up to a poll period, roughly a training step, and raise peak memory by that much.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from typing import Any

import pytest
import torch
import torch.distributed as dist

from ds.core.comm import TorchCommunicator
from ds.core.testing import run_distributed

SIZE = 1031  # odd, so no shard boundary lines up with a power of two
GRACE_SECONDS = 2.0
HEARTBEAT_SECONDS_IN_TEST = 30.0


def _freed_after_wait(comm: TorchCommunicator, use_async: bool) -> dict[str, Any]:
    """Issue each kind of collective on fresh buffers, wait, drop them; report which survive."""
    rank, world = comm.rank, comm.world_size
    bucket = torch.full((SIZE,), float(rank + 1))
    shard_in = torch.arange(world * SIZE, dtype=torch.float32) * (rank + 1)
    shard_out = torch.empty(SIZE)
    gathered = torch.empty(world * SIZE)
    piece = torch.full((SIZE,), float(rank))

    handles = [
        comm.all_reduce(bucket, async_op=use_async),
        comm.reduce_scatter_tensor(shard_out, shard_in, async_op=use_async),
        comm.all_gather_into_tensor(gathered, piece, async_op=use_async),
    ]
    for handle in handles:
        if handle is not None:
            handle.wait()  # the handles stay referenced: having waited must be enough
    values = {
        "all_reduce": bucket[0].item(),
        "reduce_scatter": shard_out[-1].item(),
        "all_gather": gathered[-1].item(),
    }
    buffers = {"bucket": bucket, "shard_in": shard_in, "shard_out": shard_out, "gathered": gathered, "piece": piece}
    # A tensor whose Python object died while C++ still holds it is kept alive with it, so
    # the weak reference lives exactly as long as anything (a torch Work) pins the tensor.
    refs = {name: weakref.ref(tensor) for name, tensor in buffers.items()}
    del bucket, shard_in, shard_out, gathered, piece, buffers
    alive = _survivors(refs)
    completed = all(handle.is_completed() for handle in handles if handle is not None)
    return {"values": values, "alive": alive, "completed": completed}


def _survivors(refs: dict[str, weakref.ref[torch.Tensor]]) -> list[str]:
    """The buffers still alive once gloo's worker thread has let go of its finished work.

    gloo marks a collective complete before its worker thread drops its own reference to
    the work (and so to the tensors); on a loaded machine that thread can be descheduled
    in between. A grace of GRACE_SECONDS covers it, while the communicator's poll period
    (HEARTBEAT_SECONDS_IN_TEST) is long enough that a communicator holding the work until
    its next poll keeps the buffers alive through the grace and fails the test.
    """
    deadline = time.monotonic() + GRACE_SECONDS
    while True:
        gc.collect()
        alive = sorted(name for name, ref in refs.items() if ref() is not None)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.01)


def _exercise(blocking: bool) -> dict[str, Any]:
    dist.init_process_group("gloo")
    comm = TorchCommunicator(device=torch.device("cpu"), timeout_seconds=60, blocking_wait=blocking,
                             heartbeat_seconds=HEARTBEAT_SECONDS_IN_TEST)
    out: dict[str, Any] = {
        "watchdog_running": any(t.name == "ds-comm-watchdog" for t in threading.enumerate()),
        "heartbeat": comm._watchdog.heartbeat_seconds,
        "async": _freed_after_wait(comm, use_async=True),
        "sync": _freed_after_wait(comm, use_async=False),
    }
    comm.destroy()
    dist.destroy_process_group()
    return out


def _check(results: list[dict[str, Any]]) -> None:
    world = len(results)
    for rank, out in enumerate(results):
        assert out["watchdog_running"] and out["heartbeat"] == HEARTBEAT_SECONDS_IN_TEST
        for mode in ("async", "sync"):
            assert out[mode]["values"] == {
                "all_reduce": world * (world + 1) / 2,
                "reduce_scatter": sum(k + 1 for k in range(world)) * ((rank + 1) * SIZE - 1),
                "all_gather": float(world - 1),
            }
            assert out[mode]["completed"]
            assert out[mode]["alive"] == [], f"rank {rank} ({mode}): buffers still pinned: {out[mode]['alive']}"


def test_waited_collectives_release_buffers_when_the_host_waits() -> None:
    """CPU (gloo): the host waits on each collective with the deadline."""
    _check(run_distributed(_exercise, 2, True))


def test_waited_collectives_release_buffers_when_the_watchdog_polls() -> None:
    """The accelerator path: the watchdog thread polls outstanding collectives."""
    _check(run_distributed(_exercise, 2, False))


def _nccl_waited_buffer_is_freed() -> dict[str, Any]:
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    # A poll period far beyond the test: only the wait itself may let go of the buffer.
    comm = TorchCommunicator(device=device, timeout_seconds=60, heartbeat_seconds=30.0)
    comm.all_reduce(torch.ones(8, device=device))  # NCCL allocates its own buffers now
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    bucket = torch.randn(2**22 + 3, device=device)
    expected = bucket.double().sum().item()
    handle = comm.all_reduce(bucket, async_op=True)
    assert handle is not None
    handle.wait()
    total = bucket.double().sum().item()
    ref = weakref.ref(bucket)
    del bucket
    torch.cuda.synchronize(device)
    time.sleep(0.5)  # torch's own NCCL watchdog (100 ms ticks) lets go of completed works
    gc.collect()
    out = {
        "blocking": comm.blocking_wait,
        "total_error": abs(total - expected) / max(abs(expected), 1.0),
        "alive": ref() is not None,
        "held_bytes": torch.cuda.memory_allocated(device) - baseline,
    }
    comm.destroy()
    dist.destroy_process_group()
    return out


@pytest.mark.gpu
def test_nccl_waited_buffer_is_freed_long_before_the_next_poll() -> None:
    """Accelerators: after the wait the watchdog holds a stream event, not torch's work."""
    out = run_distributed(_nccl_waited_buffer_is_freed, 1)[0]
    assert not out["blocking"]
    assert out["total_error"] < 1e-5  # one rank: the sum is the input (fp32 summation order)
    assert not out["alive"], "the waited all_reduce's buffer is still pinned"
    assert out["held_bytes"] == 0
