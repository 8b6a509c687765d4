"""Run a function on several local processes, as torchrun would, and collect results.

Distributed tests in every ds package are parity tests: a function runs on N gloo
processes and its per-rank results are compared with a single-process reference. This
module is the harness: it starts the processes with the environment torchrun sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), returns
what each rank's function returned, and re-raises the first failure with its rank and
traceback. It lives in core, not in tests, so plugin packages and third parties use it.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    env: dict[str, str],
    results: Any,
) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(1)
    try:
        value = fn(*args)
        # Plain pickle bytes: the queue's own pickler would share tensors through file
        # descriptors that die with this process before the parent reads them.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        # A forked rank leaves through os._exit, which skips what an interpreter's exit runs;
        # run it here, so finalizers (say, of a swap folder) behave as under torchrun.
        atexit._run_exitfuncs()


class DistributedTestFailure(AssertionError):
    """A rank raised; the message carries its rank and traceback."""


PORT_ATTEMPTS = 3
RENDEZVOUS_FAILURES = ("EADDRINUSE", "Gloo connectFullMesh failed")
"""Failures of process-group setup, not of the function under test: retried on a new port."""


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 600.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` fresh processes and return results by rank.

    ``fn`` must be importable by name (a module-level function): processes are forked from
    a server process that has imported some torch modules and nothing else (see
    :func:`_start_context`), not from the caller, whose torch threads and distributed state
    a child must not inherit. Each rank sees the caller's environment as it is at this
    call, plus ``env``. Raises :class:`DistributedTestFailure` if any rank fails or the
    run exceeds ``timeout`` seconds. The rendezvous port is free when chosen but another
    process can take it before rank 0 listens, and on a loaded machine gloo's mesh of
    loopback connections can be cut while it forms; a run that failed in either way is
    retried on a new port (ranked functions set up their process group before anything
    else, so a retry repeats none of their work).
    """
    for attempt in range(PORT_ATTEMPTS):
        try:
            return _run_once(fn, world_size, args, timeout, env or {})
        except DistributedTestFailure as failure:
            if not any(marker in str(failure) for marker in RENDEZVOUS_FAILURES) or attempt == PORT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


_SERVER_PRELOAD = ("torch", "torch.distributed", "torch.distributed.tensor", "torch._dynamo")
"""What the fork server imports before it forks the first rank (see :func:`_start_context`)."""


def _start_context() -> Any:
    """Processes forked from a server that has imported ``_SERVER_PRELOAD``: about 0.1 s
    a rank to start instead of the 2-3 s of a spawned interpreter importing torch, which
    dominated the multi-process tests. Each module is one that nearly every rank would
    otherwise import for itself:

    - ``torch``: about 1.5 s;
    - ``torch.distributed``: every rank joins a process group;
    - ``torch.distributed.tensor``: ds.core.state_names imports it, so every rank that
      imports ds.core's engine or a ZeRO stage does; it pulls in sympy, about 0.7 s;
    - ``torch._dynamo``: imported by the first ``torch.optim`` optimizer a process builds
      (its methods are wrapped by ``torch._disable_dynamo``), about 0.7 s.

    ds's own modules are left out: tests edit and reinstall them, and a server started
    before that would hand the ranks stale copies. The server is started once per calling
    process, by the first call, and only imports: none of these modules starts a thread or
    registers a fork handler when imported, and the server has run no torch code and joined
    no process group when it forks. Environment variables these modules read at import take
    the values they had at that start.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(_SERVER_PRELOAD))
    return ctx


def _run_once(
    fn: Callable[..., Any], world_size: int, args: tuple[Any, ...], timeout: float, env: dict[str, str]
) -> list[Any]:
    ctx = _start_context()
    results = ctx.Queue()
    port = free_port()
    rank_env = {**os.environ, **env}
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, rank_env, results), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    collected: dict[int, Any] = {}
    failures: list[str] = []
    try:
        while len(collected) + len(failures) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty as exc:
                missing = sorted(set(range(world_size)) - set(collected))
                raise DistributedTestFailure(f"ranks {missing} did not finish within {timeout:.0f}s") from exc
            if ok:
                collected[rank] = pickle.loads(value)
            else:
                failures.append(f"rank {rank} failed:\n{value}")
                break
    finally:
        for proc in procs:
            proc.join(timeout=5 if not failures else 0.5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if failures:
        raise DistributedTestFailure("\n".join(failures))
    return [collected[rank] for rank in range(world_size)]
