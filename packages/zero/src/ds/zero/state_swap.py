"""Optimizer state kept on disk and streamed through each step: ZeRO-Infinity's NVMe offload.

With ``offload_optimizer: {device: nvme}`` a rank's fp32 optimizer state (and, if asked,
its fp32 master weights) does not stay in memory. It is split into sub-groups (DeepSpeed's
``sub_group_size`` elements each) that live in files, and a step visits them one at a
time. :meth:`SwappedStates.stream` pipelines that visit through three rotating buffers:
while the caller updates sub-group *i*, sub-group *i+1* is being read and sub-group *i-1*
written back, so the disk works during the update and memory holds three sub-groups,
not all of them.

How a partitioner uses it (the partitioner owns the wiring; this module owns the I/O)::

    states = SwappedStates(nvme_path / f"rank{rank}", [p.numel() for p in master_parts],
                           names=("exp_avg", "exp_avg_sq"))          # zeros on disk
    # each optimizer step, after the gradients of master_parts are reduced:
    scalars = AdamScalars.for_step(step=step, lr=lr, betas=betas, eps=eps,
                                   weight_decay=wd, decoupled_weight_decay=True)
    for index, state in states.stream():
        adam_update_(master_parts[index], grads[index], state["exp_avg"], state["exp_avg_sq"],
                     scalars, isa=resolve_isa(), low_precision_param=bf16_parts[index])
    # checkpoints: states.read(index) -> {name: tensor}; states.write(index, tensors)

To keep the master weights on disk too, add ``"param"`` to ``names`` with no initial
value (``initial={"exp_avg": 0.0, "exp_avg_sq": 0.0}``), ``write`` each sub-group's
weights once, and update ``state["param"]`` in the loop. The tensors a stream yields are
aligned CPU buffers swapped in place (no copy); they are valid until the loop advances,
and whatever the caller leaves in them is written back. Breaking out of the loop writes
back nothing for the sub-group in hand.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

from ds.zero.swap import SwapConfig, SwapHandle, TensorSwapper

_SLOTS = 3  # read-ahead, in use, write-behind


class SwappedStates:
    """Per-sub-group fp32 state tensors on disk under ``folder``, streamed by :meth:`stream`.

    ``numels``: elements of each sub-group. ``names``: the state tensors each sub-group
    has. ``initial``: the value every state starts at, or one per name; a name it does not
    cover must be given with :meth:`write` before the first stream.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        numels: Sequence[int],
        names: Sequence[str] = ("exp_avg", "exp_avg_sq"),
        *,
        initial: float | Mapping[str, float] = 0.0,
        config: SwapConfig | None = None,
    ) -> None:
        if not numels or min(numels) < 1:
            raise ValueError(f"numels must list at least one sub-group of >= 1 element, got {list(numels)}")
        values = dict(initial) if isinstance(initial, Mapping) else dict.fromkeys(names, initial)
        unknown = set(values) - set(names)
        if unknown:
            raise ValueError(f"initial values for {sorted(unknown)} name no state; states are {list(names)}")
        self.numels = list(numels)
        self.names = tuple(names)
        self._swapper = TensorSwapper(folder, config)
        largest = max(self.numels)
        self._slots = [{name: self._swapper.empty((largest,)) for name in self.names} for _ in range(_SLOTS)]
        self._writes: list[list[SwapHandle]] = [[] for _ in range(_SLOTS)]
        handles = []
        for name, value in values.items():
            filled = self._slots[0][name].fill_(value)
            handles += [self._swapper.swap_out(_key(index, name), filled[:numel])
                        for index, numel in enumerate(self.numels)]
        for handle in handles:
            handle.wait()

    def __len__(self) -> int:
        return len(self.numels)

    def stream(self, order: Iterable[int] | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yield ``(index, {name: state})`` for every sub-group (in ``order``), pipelined."""
        order = list(range(len(self))) if order is None else list(order)
        reads = self._start_reads(0, order[0]) if order else []
        try:
            for position, index in enumerate(order):
                for handle in reads:
                    handle.wait()
                reads = self._start_reads((position + 1) % _SLOTS, order[position + 1]) \
                    if position + 1 < len(order) else []
                views = self._views(position % _SLOTS, index)
                yield index, views
                self._writes[position % _SLOTS] = [self._swapper.swap_out(_key(index, name), view)
                                                   for name, view in views.items()]
        finally:
            for handle in reads:
                handle.wait()
            self._wait_writes()

    def read(self, index: int) -> dict[str, torch.Tensor]:
        """Copies of one sub-group's state (for a checkpoint); not during a stream."""
        state = {name: torch.empty(self.numels[index]) for name in self.names}
        for handle in [self._swapper.swap_in(_key(index, name), out) for name, out in state.items()]:
            handle.wait()
        return state

    def write(self, index: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace some or all of one sub-group's state (checkpoint load, initial weights)."""
        for name, tensor in tensors.items():
            if name not in self.names or tensor.numel() != self.numels[index] or tensor.dtype != torch.float32:
                raise ValueError(f"sub-group {index} holds fp32 states {list(self.names)} of "
                                 f"{self.numels[index]} elements; got {name!r} as {tensor.dtype} of "
                                 f"{tensor.numel()} elements")
        for handle in [self._swapper.swap_out(_key(index, name), tensor.reshape(-1))
                       for name, tensor in tensors.items()]:
            handle.wait()

    def close(self) -> None:
        """Delete the state files."""
        self._swapper.close()

    def _start_reads(self, slot: int, index: int) -> list[SwapHandle]:
        for handle in self._writes[slot]:  # the slot's previous sub-group must be out first
            handle.wait()
        self._writes[slot] = []
        return [self._swapper.swap_in(_key(index, name), view) for name, view in self._views(slot, index).items()]

    def _views(self, slot: int, index: int) -> dict[str, torch.Tensor]:
        return {name: buffer[:self.numels[index]] for name, buffer in self._slots[slot].items()}

    def _wait_writes(self) -> None:
        for slot, handles in enumerate(self._writes):
            for handle in handles:
                handle.wait()
            self._writes[slot] = []


def _key(index: int, name: str) -> str:
    return f"{index}.{name}"
