"""What ds asks of a collective-communication backend.

Every collective in ds (gradient all-reduce, ZeRO's reduce-scatter and all-gather, MoE's
all-to-all, pipeline broadcasts, checkpoint barriers) goes through a
:class:`Communicator`, never through ``torch.distributed`` directly, so a plugin
registered through ``ds_register_communicators`` can replace all of them at once
(compressed, hierarchical or instrumented collectives). Core's implementation is
:class:`ds.core.comm.TorchCommunicator`.

The signatures follow ``torch.distributed`` so code reads the same either way: tensors
are updated in place, ``group=None`` means every rank, ``broadcast``'s ``src`` is a
global rank, and ``async_op=True`` returns a :class:`CollectiveHandle` to wait on
later instead of ``None``. Unlike torch, waiting is bounded: a collective that does not
complete within the communicator's timeout raises
:class:`ds.core.errors.CollectiveTimeoutError` naming the operation, the group and the
ranks that never arrived.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch.distributed import ProcessGroup, ReduceOp


@runtime_checkable
class CollectiveHandle(Protocol):
    """An asynchronous collective in flight."""

    def wait(self) -> None:
        """Block until the collective is done (on accelerators: until its stream is
        ordered after it), raising ``CollectiveTimeoutError`` if it stalls."""

    def is_completed(self) -> bool:
        """Whether the collective has finished, without waiting."""


@runtime_checkable
class Communicator(Protocol):
    """Collectives over process groups, with a timeout that names the missing ranks."""

    @property
    def rank(self) -> int:
        """This process's global rank."""

    @property
    def world_size(self) -> int:
        """The number of processes in the job."""

    @property
    def device(self) -> torch.device:
        """Where this rank's tensors for collectives live (``cuda:LOCAL_RANK`` or ``cpu``)."""

    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: ReduceOp.RedOpType = ReduceOp.SUM,
        group: ProcessGroup | None = None,
        async_op: bool = False,
    ) -> CollectiveHandle | None:
        """Reduce ``tensor`` over the group in place; every rank gets the result."""

    def reduce_scatter_tensor(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        op: ReduceOp.RedOpType = ReduceOp.SUM,
        group: ProcessGroup | None = None,
        async_op: bool = False,
    ) -> CollectiveHandle | None:
        """Reduce ``input`` (group size x ``output``) and give rank i the i-th chunk."""

    def all_gather_into_tensor(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        group: ProcessGroup | None = None,
        async_op: bool = False,
    ) -> CollectiveHandle | None:
        """Concatenate every rank's ``input`` into ``output`` in group-rank order."""

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        group: ProcessGroup | None = None,
        async_op: bool = False,
        *,
        output_split_sizes: list[int] | None = None,
        input_split_sizes: list[int] | None = None,
    ) -> CollectiveHandle | None:
        """Send chunk j of ``input`` to group rank j; receive into ``output`` chunk by
        chunk. Split sizes (rows along dim 0) allow uneven chunks, as MoE dispatch needs;
        without them chunks are equal."""

    def broadcast(
        self,
        tensor: torch.Tensor,
        src: int,
        group: ProcessGroup | None = None,
        async_op: bool = False,
    ) -> CollectiveHandle | None:
        """Copy ``tensor`` from global rank ``src`` to every rank of the group."""

    def barrier(self, group: ProcessGroup | None = None) -> None:
        """Return once every rank of the group has reached the barrier."""

    def wait(self, handle: CollectiveHandle) -> None:
        """Wait for an asynchronous collective, bounded by the communicator's timeout."""


__all__ = ["CollectiveHandle", "Communicator"]
