"""A collective that a rank never joins raises CollectiveTimeoutError naming the op, the
group and the missing ranks within the timeout, instead of hanging; both on CPU, where
the host waits with a deadline, and in the watched mode accelerators use."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from ds.core.comm import GroupInfo, TorchCommunicator, init_distributed
from ds.core.comm.watchdog import Watchdog
from ds.core.errors import CollectiveTimeoutError, ConfigError
from ds.core.mesh import Mesh
from ds.core.testing import run_distributed

TIMEOUT = 2.5
DONE_KEY = "test/diagnosed"


def _hold_until_diagnosed() -> None:
    """Keep the skipping rank alive (a hang, not a crash) until the others have reported.

    Polls rather than blocking in ``store.wait``: a blocking store call holds the store
    client, which would also hold up this rank's heartbeats.
    """
    store = dist.distributed_c10d._get_default_store()
    deadline = time.monotonic() + 60
    while not store.check([DONE_KEY]) and time.monotonic() < deadline:
        time.sleep(0.05)


def _diagnosed() -> None:
    dist.distributed_c10d._get_default_store().set(DONE_KEY, "1")


def _rank_one_skips_tp_all_reduce() -> dict[str, Any]:
    comm = init_distributed(timeout_seconds=TIMEOUT)
    mesh = Mesh.build(comm, tp=2)  # tp groups [0, 1] and [2, 3]
    comm.all_reduce(torch.ones(1))  # everyone: world collective #1
    if comm.rank == 1:
        _hold_until_diagnosed()
        return {}
    summed = torch.ones(1)
    start = time.monotonic()
    try:
        comm.all_reduce(summed, group=mesh.group("tp"))
    except CollectiveTimeoutError as exc:
        elapsed = time.monotonic() - start
        _diagnosed()
        try:
            comm.barrier()
            later_call = "succeeded"
        except CollectiveTimeoutError:
            later_call = "raised"
        return {"error": str(exc), "elapsed": elapsed, "later_call": later_call}
    return {"sum": summed.item()}


def test_missing_rank_is_named_instead_of_hanging() -> None:
    results = run_distributed(_rank_one_skips_tp_all_reduce, 4)
    error = results[0]["error"]
    assert "all_reduce #1 on group 'tp' (global ranks [0, 1])" in error
    assert f"within {TIMEOUT:g} s" in error
    assert "never entered it: [1]" in error
    assert "rank 1: entered no collective on this group" in error
    assert TIMEOUT <= results[0]["elapsed"] < TIMEOUT + 10
    assert results[0]["later_call"] == "raised"  # the group is out of step: stay failed
    assert results[2] == results[3] == {"sum": 2.0}  # the other tp group is unaffected


def _watched_stall() -> dict[str, Any]:
    dist.init_process_group("gloo")
    comm = TorchCommunicator(device=torch.device("cpu"), timeout_seconds=TIMEOUT, blocking_wait=False)
    comm.all_reduce(torch.ones(1))  # completes; the watchdog forgets it
    if comm.rank == 1:
        _hold_until_diagnosed()
        return {}
    start = time.monotonic()
    handle = comm.broadcast(torch.ones(2), src=0, async_op=True)  # rank 1 never joins
    assert handle is not None
    while time.monotonic() - start < TIMEOUT + 10:
        try:
            comm.raise_if_failed()
        except CollectiveTimeoutError as exc:
            elapsed = time.monotonic() - start
            try:
                comm.all_reduce(torch.ones(1))
                next_call = "succeeded"
            except CollectiveTimeoutError as next_exc:
                next_call = str(next_exc)
            _diagnosed()
            return {"error": str(exc), "elapsed": elapsed, "next_call": next_call}
        time.sleep(0.1)
    _diagnosed()
    return {"error": None}


def test_watched_mode_reports_the_stall_at_the_next_call() -> None:
    """The accelerator path: the host never blocks, the heartbeat thread finds the stall."""
    error = run_distributed(_watched_stall, 2)[0]
    assert error["error"] is not None, "the watchdog never reported the stalled broadcast"
    assert "broadcast #2 on group 'world' (global ranks [0, 1])" in error["error"]
    assert "never entered it: [1]" in error["error"]
    assert "last entered #1 (all_reduce)" in error["error"]
    assert TIMEOUT <= error["elapsed"] < TIMEOUT + 10
    assert error["next_call"] == error["error"]


# -- diagnosis against a real store, without processes --------------------------------

GROUP = GroupInfo(key="7", label="dp", ranks=(0, 1, 2))


def _peer(store: dist.Store, rank: int, *ops: str) -> Watchdog:
    """A peer that entered ``ops`` on GROUP and published them once."""
    peer = Watchdog(store, rank, timeout_seconds=TIMEOUT)
    for op in ops:
        peer.enter(op, GROUP)
    peer.start()
    peer.stop()
    return peer


def _stalled(store: dist.Store, *ops: str, heartbeat_seconds: float = 1.0) -> str:
    me = Watchdog(store, 0, timeout_seconds=TIMEOUT, heartbeat_seconds=heartbeat_seconds)
    collective = None
    for op in ops:
        collective = me.enter(op, GROUP)
    assert collective is not None
    return str(me.diagnose(collective))


def test_diagnosis_names_silent_behind_and_mismatched_peers() -> None:
    store = dist.HashStore()
    _peer(store, 1, "all_reduce")
    message = _stalled(store, "all_reduce", "all_reduce")
    assert "all_reduce #2 on group 'dp' (global ranks [0, 1, 2])" in message
    assert "never entered it: [1, 2]" in message
    assert "rank 1: last entered #1 (all_reduce)" in message
    assert "rank 2: no heartbeat" in message

    store = dist.HashStore()
    _peer(store, 1, "all_reduce", "broadcast")
    _peer(store, 2, "all_reduce", "all_reduce")
    message = _stalled(store, "all_reduce", "all_reduce")
    assert "not all as all_reduce (rank 1: broadcast)" in message

    store = dist.HashStore()
    _peer(store, 1, "barrier")
    _peer(store, 2, "barrier")
    assert "the collective itself is stuck" in _stalled(store, "barrier")


def test_diagnosis_reports_a_peer_with_an_old_heartbeat_as_dead() -> None:
    store = dist.HashStore()
    _peer(store, 1)
    _peer(store, 2)
    time.sleep(0.1)
    message = _stalled(store, "all_reduce", heartbeat_seconds=0.01)
    assert "rank 1: entered no collective on this group, heartbeat" in message
    assert "dead or frozen" in message


def test_heartbeat_thread_stops_promptly_and_timeout_must_be_positive() -> None:
    watchdog = Watchdog(dist.HashStore(), 0, timeout_seconds=TIMEOUT, heartbeat_seconds=0.05)
    watchdog.start()
    assert watchdog.running
    start = time.monotonic()
    watchdog.stop()
    watchdog.stop()
    assert not watchdog.running and time.monotonic() - start < 1
    with pytest.raises(ConfigError, match="timeout_seconds"):
        Watchdog(dist.HashStore(), 0, timeout_seconds=0)
