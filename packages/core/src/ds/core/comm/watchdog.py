"""Turn a stalled collective into an error that names the ranks that never arrived.

Without this, a rank that skips a collective (a branch taken on one rank only, a crashed
data loader, a dead node) leaves every other rank blocked until torch's 30-minute timeout,
with a message that only says "timed out". The watchdog answers "who is missing?" without
adding host synchronisation or store traffic to the hot path:

* every rank counts the collectives it enters, per process group (a dict update); the
  count is the collective's sequence number, the same on every rank that issues the same
  collectives in the same order, as torch requires;
* a daemon thread publishes this rank's counts to the job's torch.distributed store every
  ``heartbeat_seconds`` (one small ``set``, off the training thread);
* only when a collective runs out of time does the waiting rank read its peers' counts:
  a peer whose count for the group is below the stalled collective's sequence number
  never entered it; a peer whose last heartbeat is old is dead or frozen. (Heartbeats
  share the store client with the training thread, so a rank blocked in a long store
  call of its own, such as a rendezvous, publishes nothing meanwhile and looks frozen.)

There are two ways of waiting, chosen by the communicator:

* blocking (CPU, gloo): the caller waits on the work with the deadline
  (:meth:`Watchdog.wait`) and the error is raised right there;
* watched (NCCL and other accelerators): blocking the CPU on every collective would
  serialise host and device, so callers never wait on the host; the heartbeat thread
  also polls outstanding collectives for completion. When one is overdue it logs the
  error, calls ``on_stall`` (the communicator aborts the group so the device stops
  waiting) and keeps the error, which the next communicator call raises.

A torch work keeps its collective's tensors alive, so the watchdog holds one only until
the collective is waited on: then it forgets a finished collective at once
(:meth:`Watchdog.finished`) and swaps an unfinished one's work for a probe that pins no
tensors (:meth:`Watchdog.watch` again, with a stream event). Holding works until the next
poll would keep every temporary buffer (gradient buckets, gather outputs) alive for up
to a heartbeat, about a training step, and raise peak memory by all of them.

A collective is declared stalled ``timeout + grace`` seconds after it started; the grace
(1.5 heartbeats) lets every live peer publish once more, so the diagnosis reads fresh
counts and a collective that completes at the last moment is not reported. After a stall
the communicator stays failed: the group's sequence numbers no longer agree across ranks,
so every later call raises the same error.
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from torch.distributed.distributed_c10d import Store

from ds.core.errors import CollectiveTimeoutError, ConfigError

HEARTBEAT_SECONDS = 1.0
"""How often each rank publishes its collective counts; also the polling period."""

HEARTBEAT_KEY_PREFIX = "heartbeat/"
"""Store key prefix; the rank number follows."""

_STALE_HEARTBEATS = 3
"""A peer silent for this many heartbeat periods is reported as dead or frozen."""

_MIN_WAIT = timedelta(milliseconds=1)
"""torch reads a zero timeout as "wait forever", so an expired deadline still waits 1 ms."""

logger = logging.getLogger("ds.core.comm")


@dataclass(frozen=True)
class GroupInfo:
    """A process group as errors and logs name it."""

    key: str
    """torch's group name: the same on every member, so it keys the published counts."""
    label: str
    """For people: ``world``, a mesh axis such as ``tp``, or torch's group description."""
    ranks: tuple[int, ...]
    """The group's members as global ranks, in group-rank order."""

    def describe(self) -> str:
        return f"group {self.label!r} (global ranks {list(self.ranks)})"


@dataclass(frozen=True, eq=False)
class Collective:
    """One collective this rank entered; identity-hashed, so keying the watch list is cheap."""

    op: str
    group: GroupInfo
    sequence: int
    """1 for the first collective this rank entered on the group, 2 for the next, ..."""
    started: float
    """``time.monotonic()`` when it was entered."""


class Work(Protocol):
    """The part of ``torch.distributed.Work`` the watchdog uses."""

    def wait(self, timeout: timedelta = ...) -> bool: ...

    def is_completed(self) -> bool: ...


IsCompleted = Callable[[], bool]
"""How the heartbeat thread asks whether a watched collective finished, without blocking."""


class Watchdog:
    """Counts collectives, publishes heartbeats and names the ranks a stalled one lacks.

    ``store`` is shared by every rank (the default group's store); ``on_stall`` receives
    the overdue collective in watched mode and should abort its group.
    """

    def __init__(
        self,
        store: Store,
        rank: int,
        *,
        timeout_seconds: float,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        on_stall: Callable[[Collective], None] | None = None,
    ) -> None:
        if timeout_seconds <= 0 or heartbeat_seconds <= 0:
            raise ConfigError(
                f"communicator timeout ({timeout_seconds} s) and heartbeat ({heartbeat_seconds} s) "
                "must be positive; set communicator.timeout_seconds to the longest a collective "
                "may take, e.g. 1800."
            )
        self.rank = rank
        self.timeout_seconds = timeout_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.failure: CollectiveTimeoutError | None = None
        self._store = store
        self._on_stall = on_stall
        self._entered: dict[str, tuple[int, str]] = {}
        self._outstanding: dict[Collective, IsCompleted] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ds-comm-watchdog", daemon=True)

    @property
    def grace_seconds(self) -> float:
        return 1.5 * self.heartbeat_seconds

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        """Publish a first heartbeat, so a silent peer is known never to have started."""
        self._publish()
        self._thread.start()
        # A daemon thread inside a store call while the interpreter tears torch down can
        # crash the exiting process; stopping it first makes exit clean even without destroy().
        atexit.register(self.stop)

    def stop(self) -> None:
        """Stop the heartbeat thread; idempotent, returns within about one heartbeat."""
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.heartbeat_seconds)
        atexit.unregister(self.stop)

    # -- the hot path ---------------------------------------------------------------

    def enter(self, op: str, group: GroupInfo) -> Collective:
        """Count a collective about to be issued; raise if an earlier one stalled."""
        if self.failure is not None:
            raise CollectiveTimeoutError(str(self.failure)) from self.failure
        sequence = self._entered.get(group.key, (0, ""))[0] + 1
        # One tuple store, so the heartbeat thread never sees a count without its op.
        self._entered[group.key] = (sequence, op)
        return Collective(op, group, sequence, time.monotonic())

    def watch(self, collective: Collective, is_completed: IsCompleted) -> None:
        """Have the heartbeat thread poll ``is_completed`` instead of waiting on the collective.

        Watching a collective again replaces its probe: pass ``work.is_completed`` at
        launch, then something that pins no tensors once the work has been waited on.
        """
        with self._lock:
            self._outstanding[collective] = is_completed

    def finished(self, collective: Collective) -> None:
        """Forget a collective known to be complete, releasing whatever its probe kept alive."""
        with self._lock:
            self._outstanding.pop(collective, None)

    def wait(self, collective: Collective, work: Work) -> None:
        """Block until ``work`` completes or its deadline passes, then name the missing ranks."""
        remaining = collective.started + self.timeout_seconds + self.grace_seconds - time.monotonic()
        try:
            work.wait(max(timedelta(seconds=remaining), _MIN_WAIT))
        except RuntimeError:
            if work.is_completed():
                raise  # the collective failed by itself (e.g. a peer's connection dropped)
            self.failure = self.diagnose(collective)
            raise self.failure from None

    def raise_if_failed(self) -> None:
        if self.failure is not None:
            raise CollectiveTimeoutError(str(self.failure)) from self.failure

    # -- the heartbeat thread -------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.wait(self.heartbeat_seconds):
            self._publish()
            self._check_outstanding()

    def _publish(self) -> None:
        payload = json.dumps({"time": time.time(), "groups": self._entered.copy()})
        try:
            self._store.set(f"{HEARTBEAT_KEY_PREFIX}{self.rank}", payload)
        except RuntimeError as exc:  # store gone (shutdown, rank 0 died): diagnosis degrades
            logger.debug("rank %d could not publish its heartbeat: %s", self.rank, exc)

    def _check_outstanding(self) -> None:
        now = time.monotonic()
        limit = self.timeout_seconds + self.grace_seconds
        with self._lock:
            self._outstanding = {c: done for c, done in self._outstanding.items() if not done()}
            overdue = next((c for c in self._outstanding if now - c.started > limit), None)
            if overdue is not None:
                self._outstanding.clear()
        if overdue is None or self.failure is not None:
            return
        failure = self.diagnose(overdue)
        logger.error("%s", failure)
        self.failure = failure
        if self._on_stall is not None:
            try:
                self._on_stall(overdue)
            except RuntimeError as exc:
                logger.warning("aborting %s after the stall failed: %s", overdue.group.describe(), exc)

    # -- diagnosis ------------------------------------------------------------------

    def diagnose(self, collective: Collective) -> CollectiveTimeoutError:
        """The error for a stalled collective, naming the peers that never entered it."""
        group = collective.group
        head = (
            f"{collective.op} #{collective.sequence} on {group.describe()} did not complete "
            f"within {self.timeout_seconds:g} s (seen from rank {self.rank})."
        )
        peers = [r for r in group.ranks if r != self.rank]
        try:
            progress = self._read_peers(peers)
        except RuntimeError as exc:
            return CollectiveTimeoutError(
                f"{head} Which ranks did not arrive is unknown: reading their heartbeats from "
                f"the store failed ({exc})."
            )

        def entered(rank: int) -> int:
            peer = progress[rank]
            return 0 if peer is None else peer.entered_on(group.key)

        missing = [r for r in peers if entered(r) < collective.sequence]
        if missing:
            details = "; ".join(self._describe_peer(r, progress[r], group.key) for r in missing)
            return CollectiveTimeoutError(
                f"{head} Ranks that never entered it: {missing} ({details}). Every rank of a group "
                "must issue the same collectives in the same order; look for a branch, an "
                "exception or an uneven data loader on the ranks named."
            )
        mismatched = {
            r: peer.last_op_on(group.key)
            for r, peer in ((r, progress[r]) for r in peers)
            if peer is not None and entered(r) == collective.sequence
            and peer.last_op_on(group.key) != collective.op
        }
        if mismatched:
            issued = ", ".join(f"rank {r}: {op}" for r, op in mismatched.items())
            return CollectiveTimeoutError(
                f"{head} Every rank reached collective #{collective.sequence} on this group, but "
                f"not all as {collective.op} ({issued}): the ranks issue different collectives."
            )
        return CollectiveTimeoutError(
            f"{head} Every rank of the group entered it, so the collective itself is stuck: check "
            "that all ranks pass tensors of the same size and dtype, and check the network."
        )

    def _read_peers(self, peers: list[int]) -> dict[int, _Heartbeat | None]:
        now = time.time()
        found: dict[int, _Heartbeat | None] = {}
        for rank in peers:
            key = f"{HEARTBEAT_KEY_PREFIX}{rank}"
            if not self._store.check([key]):
                found[rank] = None
                continue
            record = json.loads(self._store.get(key))
            found[rank] = _Heartbeat(now - float(record["time"]), record["groups"])
        return found

    def _describe_peer(self, rank: int, heartbeat: _Heartbeat | None, group_key: str) -> str:
        if heartbeat is None:
            return f"rank {rank}: no heartbeat, so it never started a communicator or died at once"
        count = heartbeat.entered_on(group_key)
        where = (
            f"last entered #{count} ({heartbeat.last_op_on(group_key)})"
            if count else "entered no collective on this group"
        )
        state = f"heartbeat {heartbeat.age:.1f} s ago"
        if heartbeat.age > _STALE_HEARTBEATS * self.heartbeat_seconds:
            state += ", so it is dead or frozen"
        return f"rank {rank}: {where}, {state}"


@dataclass(frozen=True)
class _Heartbeat:
    """What a peer last published: its age in seconds and ``{group key: [count, op]}``."""

    age: float
    groups: dict[str, list[int | str]]

    def entered_on(self, group_key: str) -> int:
        return int(self.groups.get(group_key, (0, ""))[0])

    def last_op_on(self, group_key: str) -> str:
        return str(self.groups.get(group_key, (0, ""))[1])


__all__ = ["HEARTBEAT_SECONDS", "Collective", "GroupInfo", "Watchdog", "Work"]
