"""Stage 3's fetch order: traced on the first forward pass, replayed as FSDP2 explicit prefetch.

Registration order is a guess at execution order; a model that runs its blocks in
another order (an encoder registered after the decoder, a routed or shared block) makes
that guess prefetch the wrong unit, which costs memory and hides no communication.
DeepSpeed traces the order its hooks see on the first step and replays it after; this
module does the same with FSDP2's own per-module prefetch lists, so the replay adds no
Python to the per-step path:

1. :class:`ForwardOrderTrace` hooks the root module and every shard unit, and records
   the units in the order their forward starts, during the root's forward only (so
   activation-checkpoint recomputation in backward is not mistaken for forward order).
   Each new root forward starts the record again, so the last complete pass wins.
2. :func:`prefetch_plan` turns that order into one forward and one backward list per
   unit; :func:`apply_prefetch_plan` hands them to FSDP2, after which the hooks go.

FSDP2 keeps one list per module and fires the forward list on a module's first entry of
a pass, and the backward list every time the module's backward starts. So a unit used
twice prefetches, in forward, what follows its first use and, in backward, what precedes
its last use (what follows it in the reversed order): the window starts at a unit's first
occurrence in the direction of travel. A window holds the next ``ahead`` positions,
without the unit itself and without repeats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.hooks import RemovableHandle


def prefetch_window(order: Sequence[nn.Module], ahead: int) -> dict[nn.Module, list[nn.Module]]:
    """For each unit in ``order``: the distinct other units in the ``ahead`` positions after its first use."""
    window: dict[nn.Module, list[nn.Module]] = {}
    for position, unit in enumerate(order):
        if unit in window:
            continue
        following: list[nn.Module] = []
        for other in order[position + 1 : position + 1 + ahead]:
            if other is not unit and other not in following:
                following.append(other)
        window[unit] = following
    return window


@dataclass(frozen=True)
class PrefetchPlan:
    """Per-unit prefetch lists derived from one traced forward order."""

    order: tuple[nn.Module, ...]
    forward: dict[nn.Module, list[nn.Module]]
    backward: dict[nn.Module, list[nn.Module]]


def prefetch_plan(order: Sequence[nn.Module], ahead: int) -> PrefetchPlan:
    """Forward: the next ``ahead`` units after each unit's first use; backward: the same on the reversed order."""
    if ahead < 1:
        raise ValueError(f"prefetch must look at least one unit ahead, got {ahead}")
    return PrefetchPlan(tuple(order), prefetch_window(order, ahead), prefetch_window(order[::-1], ahead))


def apply_prefetch_plan(plan: PrefetchPlan, units: Sequence[nn.Module]) -> None:
    """Set every unit's FSDP2 prefetch lists; a unit the trace never saw prefetches nothing."""
    for unit in units:
        assert isinstance(unit, FSDPModule)
        unit.set_modules_to_forward_prefetch(plan.forward.get(unit, []))  # type: ignore[arg-type]
        unit.set_modules_to_backward_prefetch(plan.backward.get(unit, []))  # type: ignore[arg-type]


class ForwardOrderTrace:
    """Records the order in which shard units start forward, inside the root's forward."""

    def __init__(self, root: nn.Module, units: Sequence[nn.Module]) -> None:
        self._recording = False
        self._current: list[nn.Module] = []
        self._completed: list[nn.Module] = []
        self._handles: list[RemovableHandle] = [
            root.register_forward_pre_hook(self._root_starts),
            root.register_forward_hook(self._root_ends),
            *(unit.register_forward_pre_hook(self._unit_starts) for unit in units),
        ]

    @property
    def order(self) -> list[nn.Module]:
        """Units in the order the last complete root forward ran them (empty before one completes)."""
        return list(self._completed)

    def remove(self) -> None:
        """Drop the hooks: after this the trace costs nothing per step."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _root_starts(self, module: nn.Module, args: Any) -> None:
        self._recording = True
        self._current = []

    def _root_ends(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._current:
            self._completed = self._current
        self._recording = False

    def _unit_starts(self, module: nn.Module, args: Any) -> None:
        if self._recording:
            self._current.append(module)
