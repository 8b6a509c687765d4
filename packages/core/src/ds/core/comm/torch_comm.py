"""Core's communicator: torch.distributed collectives that fail loudly instead of hanging.

Each collective is issued asynchronously to torch and then, unless the caller asked for
``async_op=True``, completed at once; either way completion goes through the
:class:`~ds.core.comm.watchdog.Watchdog`, which bounds the wait and names the ranks that
never arrived. What "completed" means depends on the device:

* on CPU (gloo) the host waits for the result with the deadline, as a synchronous torch
  collective would;
* on accelerators (NCCL, RCCL, ...) the host never blocks: waiting only orders the
  current stream after the collective, exactly as torch does, and the watchdog thread
  polls the outstanding works instead. A stall is logged when found, the group is aborted
  and the error is raised by the next call on this communicator (or by
  :meth:`TorchCommunicator.raise_if_failed`, which a training loop may call per step).

The per-collective cost over plain torch is a dict update for the sequence number, one
small object, and (only with ``log_collectives``) a record. Nothing talks to the store
or the other ranks until a collective is overdue.

Several communicators may live in one process (``ds.core.initialize`` called twice in a
notebook): each publishes under its own store prefix, numbered in creation order, which
matches across ranks because every rank creates them in the same order.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, ReduceOp
from torch.distributed.distributed_c10d import PrefixStore

from ds.core.comm.collective_log import CollectiveLog, CollectiveRecord, CollectiveStats
from ds.core.comm.protocol import CollectiveHandle
from ds.core.comm.watchdog import HEARTBEAT_SECONDS, Collective, GroupInfo, IsCompleted, Watchdog
from ds.core.errors import DsError

DEFAULT_TIMEOUT_SECONDS = 1800.0
"""How long a collective may take before it is reported as stalled (torch's default too)."""

# torch 2.13 renamed the single-tensor collectives and deprecated the old names, which
# older releases still need.
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_instance_numbers = itertools.count()


class TorchCollectiveHandle:
    """A collective issued with ``async_op=True``; :meth:`wait` is bounded by the timeout.

    :meth:`wait` lets go of torch's work, which keeps the collective's tensors alive, so a
    handle kept after waiting (in a bucket, a list of pending reductions) pins no memory.
    """

    __slots__ = ("_collective", "_comm", "_record", "_work")

    def __init__(
        self,
        comm: TorchCommunicator,
        collective: Collective,
        work: dist.Work,
        record: CollectiveRecord | None,
    ) -> None:
        self._comm = comm
        self._collective = collective
        self._work: dist.Work | None = work
        self._record = record

    @property
    def work(self) -> dist.Work:
        """torch's own handle, for ``get_future()`` and the like; only until :meth:`wait`."""
        if self._work is None:
            raise DsError(
                f"the torch work of {self._collective.op} #{self._collective.sequence} was released "
                "when the handle was waited on; read handle.work before calling wait()."
            )
        return self._work

    def wait(self) -> None:
        if self._work is not None:
            self._comm._complete(self._collective, self._work, self._record)
            self._work = None

    def is_completed(self) -> bool:
        return self._work is None or self._work.is_completed()


class TorchCommunicator:
    """:class:`~ds.core.comm.Communicator` over the initialised torch.distributed job.

    Build it with :func:`ds.core.comm.init_distributed`, which also starts the job. Direct
    construction wraps a default process group that already exists:

    * ``device``: where collective tensors live; ``cpu`` waits on the host (blocking),
      anything else is watched from the heartbeat thread (see the module docstring);
    * ``timeout_seconds``: how long one collective may take;
    * ``log_collectives``: keep a :class:`~ds.core.comm.CollectiveLog`;
    * ``blocking_wait``: override the waiting strategy chosen from ``device``;
    * ``owns_process_group``: :meth:`destroy` also destroys torch's default group.
    """

    def __init__(
        self,
        *,
        device: torch.device,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        log_collectives: bool = False,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        blocking_wait: bool | None = None,
        owns_process_group: bool = False,
    ) -> None:
        if not dist.is_initialized():
            raise DsError(
                "TorchCommunicator needs torch.distributed to be initialised; use "
                "ds.core.comm.init_distributed(), which initialises it from the launcher's "
                "environment or as a single process."
            )
        self._rank = dist.get_rank()
        self._world_size = dist.get_world_size()
        self._device = device
        self._blocking = device.type == "cpu" if blocking_wait is None else blocking_wait
        self._owns_process_group = owns_process_group
        self._groups: dict[ProcessGroup | None, GroupInfo] = {}
        self._process_groups: dict[str, ProcessGroup] = {}
        self._log = CollectiveLog() if log_collectives else None
        # torch has no public accessor for the default group's store; using it needs no new
        # connection or port, since its rendezvous already connected every rank to it.
        store = PrefixStore(f"ds/comm/{next(_instance_numbers)}/", dist.distributed_c10d._get_default_store())
        self._watchdog = Watchdog(
            store,
            self._rank,
            timeout_seconds=timeout_seconds,
            heartbeat_seconds=heartbeat_seconds,
            on_stall=self._abort_group,
        )
        self._watchdog.start()

    # -- identity -------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def timeout_seconds(self) -> float:
        return self._watchdog.timeout_seconds

    @property
    def blocking_wait(self) -> bool:
        """True when the host waits on each collective with the timeout (CPU)."""
        return self._blocking

    # -- collectives ----------------------------------------------------------------

    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: ReduceOp.RedOpType = ReduceOp.SUM,
        group: ProcessGroup | None = None,
        async_op: bool = False,
    ) -> TorchCollectiveHandle | None:
        return self._issue(
            "all_reduce", group, tensor.nbytes, async_op,
            lambda: dist.all_reduce(tensor, op=op, group=group, async_op=True),
        )

    def reduce_scatter_tensor(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        op: ReduceOp.RedOpType = ReduceOp.SUM,
        group: ProcessGroup | None = None,
        async_op: bool = False,
    ) -> TorchCollectiveHandle | None:
        return self._issue(
            "reduce_scatter_tensor", group, input.nbytes, async_op,
            lambda: _reduce_scatter_single(output, input, op=op, group=group, async_op=True),
        )

    def all_gather_into_tensor(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        group: ProcessGroup | None = None,
        async_op: bool = False,
    ) -> TorchCollectiveHandle | None:
        return self._issue(
            "all_gather_into_tensor", group, output.nbytes, async_op,
            lambda: _all_gather_single(output, input, group=group, async_op=True),
        )

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        group: ProcessGroup | None = None,
        async_op: bool = False,
        *,
        output_split_sizes: list[int] | None = None,
        input_split_sizes: list[int] | None = None,
    ) -> TorchCollectiveHandle | None:
        return self._issue(
            "all_to_all_single", group, input.nbytes, async_op,
            lambda: dist.all_to_all_single(
                output, input, output_split_sizes, input_split_sizes, group=group, async_op=True
            ),
        )

    def broadcast(
        self,
        tensor: torch.Tensor,
        src: int,
        group: ProcessGroup | None = None,
        async_op: bool = False,
    ) -> TorchCollectiveHandle | None:
        return self._issue(
            "broadcast", group, tensor.nbytes, async_op,
            lambda: dist.broadcast(tensor, src, group=group, async_op=True),
        )

    def barrier(self, group: ProcessGroup | None = None) -> None:
        self._issue("barrier", group, 0, False, lambda: dist.barrier(group=group, async_op=True))

    def wait(self, handle: CollectiveHandle) -> None:
        handle.wait()

    # -- health, logging, shutdown ---------------------------------------------------

    def raise_if_failed(self) -> None:
        """Raise the stall the watchdog found in the background, if any.

        On accelerators a stall is found by the heartbeat thread; every collective call
        raises it, and a loop that may go a while without one can call this per step.
        """
        self._watchdog.raise_if_failed()

    @property
    def collective_log(self) -> CollectiveLog | None:
        """The record of collectives, or None unless ``log_collectives`` was set."""
        return self._log

    def collective_summary(self) -> dict[str, CollectiveStats]:
        """Count, bytes and seconds per op; empty unless ``log_collectives`` was set."""
        return {} if self._log is None else self._log.summary()

    def destroy(self) -> None:
        """Stop the heartbeat thread and, if this communicator started torch.distributed,
        destroy the default process group. Idempotent."""
        self._watchdog.stop()
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_process_group = False

    # -- internals ------------------------------------------------------------------

    def _issue(
        self,
        op: str,
        group: ProcessGroup | None,
        nbytes: int,
        async_op: bool,
        launch: Callable[[], dist.Work | None],
    ) -> TorchCollectiveHandle | None:
        collective = self._watchdog.enter(op, self._group_info(group))
        record = None if self._log is None else self._log.started(collective, nbytes)
        work = launch()
        assert work is not None, "torch returns a work for every member of the group"
        if not self._blocking:
            self._watchdog.watch(collective, work.is_completed)
        handle = TorchCollectiveHandle(self, collective, work, record)
        if async_op:
            return handle
        handle.wait()
        return None

    def _complete(self, collective: Collective, work: dist.Work, record: CollectiveRecord | None) -> None:
        if self._blocking:
            self._watchdog.wait(collective, work)
        else:
            self._watchdog.raise_if_failed()
            try:
                work.wait()
            except RuntimeError:
                self._watchdog.raise_if_failed()  # the watchdog aborted the group: say why
                raise
            # On CPU the wait returned the result (gloo's work may still report itself
            # incomplete for a moment); on accelerators it only ordered the stream.
            if self._device.type == "cpu" or work.is_completed():
                self._watchdog.finished(collective)
            else:
                self._watchdog.watch(collective, self._stream_probe())
        if record is not None and self._log is not None:
            self._log.finished(record, collective)

    def _stream_probe(self) -> IsCompleted:
        """Completion of the current stream so far, which ``work.wait()`` just ordered after the
        collective: it finishes when the collective does, but unlike the work pins no tensor."""
        event = torch.Event(device=self._device)
        event.record(torch.accelerator.current_stream(self._device))
        return event.query

    def _group_info(self, group: ProcessGroup | None) -> GroupInfo:
        info = self._groups.get(group)
        if info is None:
            info = self._groups[group] = self._describe(group)
        return info

    def _describe(self, group: ProcessGroup | None) -> GroupInfo:
        if group is not None and not isinstance(group, ProcessGroup):  # new_group's NON_GROUP_MEMBER
            raise DsError(
                f"rank {self._rank} issued a collective on a process group it is not a member "
                "of; issue it only on the ranks the group was created with."
            )
        world = dist.group.WORLD
        pg = world if group is None else group
        assert pg is not None
        description = pg.group_desc
        if pg is world:
            label = "world"
        elif description.startswith("mesh_"):  # DeviceMesh names its groups mesh_<axis>
            label = description.removeprefix("mesh_")
        elif description and description != "undefined":
            label = description
        else:
            label = pg.group_name
        self._process_groups[pg.group_name] = pg
        return GroupInfo(pg.group_name, label, tuple(dist.get_process_group_ranks(pg)))

    def _abort_group(self, collective: Collective) -> None:
        self._process_groups[collective.group.key].abort()


__all__ = ["DEFAULT_TIMEOUT_SECONDS", "TorchCollectiveHandle", "TorchCommunicator"]
