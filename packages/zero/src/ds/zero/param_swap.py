"""Stage-3 parameter shards on disk between uses: ZeRO-Infinity's parameter offload.

With ``offload_param: {device: nvme}`` the fp32 local shards FSDP2 keeps on the CPU
(``CPUOffloadPolicy``) live in files under ``nvme_path``; host memory holds a window of
shard units around the one in use, not the whole model. A shard's memory is its tensor's
storage, which FSDP2's copy-in buffer (``_sharded_param_data``) and the parameter's
``to_local()`` share: resizing that storage to zero bytes frees the memory for both, and
resizing it back and reading the file in restores both, with no FSDP2 state touched
(:class:`~ds.zero.host_shards.HostShards`, which puts each unit's shards in one storage,
checks at the first forward that FSDP2 still reads them there).

Where data moves (``ahead`` is stage 3's prefetch depth in units, ``order`` the traced
forward order of :mod:`ds.zero.stage3_trace`):

* forward, in a pre-hook that runs before FSDP2's own (which all-gathers the unit and
  prefetches the next ``ahead``): those ``1 + ahead`` units are made resident, the
  ``ahead`` after them start reading, every other unit is released. Past the last unit
  the schedule goes on in backward order, so backward starts with its window on hand;
* backward, in a module backward pre-hook (it fires before FSDP2's pre-backward hook on
  the same outputs, which all-gathers the unit again): the same on the reversed order;
* the step (:meth:`ParamSwap.step`): one unit at a time, in reverse order so it ends with
  the first units resident for the next forward; unit *i+1..i+ahead* read while *i* is
  updated, *i* written back after its update and freed once the write is done;
* recomputation under activation checkpointing re-runs forward pre-hooks inside
  backward: there the hook only makes its own unit resident.

A released unit that was not changed since its file was written is freed without I/O.
FSDP2 re-pads every sharded parameter at its lazy initialisation (the root's first
forward) and after ``module.to()``/``load_state_dict``, reading the storage; the files
are therefore written, and the first unit released, only after that first forward has
begun, and ``module.to()``/``load_state_dict`` on the sharded model are not supported.
torch's pinned tensors cannot be resized, so the shards are pageable (stage 3 does not pin
them with this offload): FSDP2's non-blocking copy out of a pageable shard has left the
shard once the call returns, so freeing it right after is safe.
"""

from __future__ import annotations

import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ds.core.errors import DsError
from ds.zero.swap import SwapConfig, SwapHandle, TensorSwapper


@dataclass(eq=False)
class _Unit:
    """One shard unit's local storages and where their bytes are."""

    module: nn.Module
    names: list[str]
    storages: list[torch.UntypedStorage]
    views: list[torch.Tensor]  # uint8 over each whole storage (padding included)
    nbytes: list[int]
    reads: list[SwapHandle] = field(default_factory=list)
    writes: list[SwapHandle] = field(default_factory=list)
    resident: bool = True
    dirty: bool = True  # memory differs from the file (no file at first)
    free_after_write: bool = False

    @property
    def size(self) -> int:
        return sum(self.nbytes)


def _distinct(units: Iterable[nn.Module]) -> list[nn.Module]:
    seen: list[nn.Module] = []
    for unit in units:
        if unit not in seen:
            seen.append(unit)
    return seen


class ParamSwap:
    """Keeps the local shards of ``units`` in files under a fresh folder in ``nvme_path``."""

    def __init__(self, root: nn.Module, units: Sequence[nn.Module], *, nvme_path: str, rank: int,
                 ahead: int, config: SwapConfig) -> None:
        Path(nvme_path).mkdir(parents=True, exist_ok=True)
        folder = tempfile.mkdtemp(prefix=f"ds_zero_params_rank{rank}_", dir=nvme_path)
        self._swapper = TensorSwapper(folder, config)
        weakref.finalize(self, _close_and_remove, self._swapper.close, Path(folder))
        self._modules = tuple(units)
        self._units: dict[nn.Module, _Unit] = {}  # described at the first forward, after FSDP2's lazy init
        self._ahead = ahead
        self._ready = False
        self._backward = False
        self._cursor = 0
        self.use_order(units)
        self._handles = [root.register_forward_pre_hook(self._root_forward_starts)]
        for unit in units:
            self._handles.append(unit.register_forward_pre_hook(self._unit_forward_starts, prepend=True))
            self._handles.append(unit.register_full_backward_pre_hook(self._unit_backward_starts))

    @staticmethod
    def _describe(index: int, unit: nn.Module) -> _Unit:
        storages: dict[int, torch.UntypedStorage] = {}
        for param in unit.parameters():
            shard = param.to_local() if isinstance(param, DTensor) else param
            storage = shard.untyped_storage()
            if storage.nbytes() and shard.device.type == "cpu":
                storages.setdefault(storage.data_ptr(), storage)
        kept = list(storages.values())
        views = [torch.empty(0, dtype=torch.uint8).set_(s, 0, (s.nbytes(),), (1,)) for s in kept]
        return _Unit(unit, [f"unit{index}.{i}" for i in range(len(kept))], kept, views, [s.nbytes() for s in kept])

    def use_order(self, order: Sequence[nn.Module]) -> None:
        """The forward order the schedule follows (registration order until traced)."""
        known = [unit for unit in order if unit in self._modules]
        self._order = tuple(known)
        self._reverse = tuple(known[::-1])

    # -- accounting --------------------------------------------------------------------

    def _described(self) -> list[_Unit]:
        return list(self._units.values()) if self._ready else \
            [self._describe(index, unit) for index, unit in enumerate(self._modules)]

    def resident_bytes(self) -> int:
        """Bytes of swapped units' shards in host memory now (reads in flight included)."""
        return sum(storage.nbytes() for unit in self._described() for storage in unit.storages)

    def total_bytes(self) -> int:
        """Bytes of all swapped units' shards, which the files hold (once the first forward began)."""
        return sum(unit.size for unit in self._described())

    def window_units(self) -> int:
        """The most units the forward and backward schedules hold at once: in use, prefetched, read ahead."""
        return 1 + 2 * self._ahead

    # -- hooks -------------------------------------------------------------------------

    def _root_forward_starts(self, module: nn.Module, args: Any) -> None:
        if not self._ready:  # FSDP2's lazy init (just before this hook) has re-padded every shard
            self._units = {unit: self._describe(index, unit) for index, unit in enumerate(self._modules)}
            self._write_all_files()
            self._ready = True
        self._backward = False
        self._cursor = 0

    def _unit_forward_starts(self, module: nn.Module, args: Any) -> None:
        if not self._ready:
            return
        if self._backward:  # recomputation under activation checkpointing
            self.ensure([module])
            return
        schedule = self._order + (self._reverse if torch.is_grad_enabled() else ())
        self._advance(schedule, module)

    def _unit_backward_starts(self, module: nn.Module, grad_output: Any) -> None:
        if not self._ready:
            return
        if not self._backward:
            self._backward = True
            self._cursor = 0
        self._advance(self._reverse + self._order, module)

    def _advance(self, schedule: tuple[nn.Module, ...], module: nn.Module) -> None:
        """Hold ``module`` and what FSDP2 prefetches from it, read the next ones, release the rest."""
        later = [i for i in range(self._cursor, len(schedule)) if schedule[i] is module]
        anywhere = later or [i for i, unit in enumerate(schedule) if unit is module]
        if not anywhere:
            need, following = [module], []
        else:
            self._cursor = position = anywhere[0]
            need = _distinct(schedule[position:position + 1 + self._ahead])
            following = [u for u in _distinct(schedule[position + 1 + self._ahead:position + 1 + 2 * self._ahead])
                         if u not in need]
        for unit in self._units:
            if unit not in need and unit not in following:
                self.release(unit)
        self.start_reads([*need, *following])
        self.ensure(need)

    # -- residency ---------------------------------------------------------------------

    def start_reads(self, modules: Iterable[nn.Module]) -> None:
        """Begin reading the shards of ``modules`` that are not in memory."""
        self._retire_writes(block=False)
        for module in modules:
            unit = self._units.get(module)
            if unit is None or unit.resident or unit.reads:
                continue
            if unit.writes:  # released but its write is still out: the memory is still there
                unit.resident, unit.free_after_write = True, False
                continue
            for storage, nbytes in zip(unit.storages, unit.nbytes, strict=True):
                storage.resize_(nbytes)
            unit.reads = [self._swapper.swap_in(name, view) for name, view in zip(unit.names, unit.views, strict=True)]

    def ensure(self, modules: Iterable[nn.Module]) -> None:
        """Return once the shards of ``modules`` are in memory (reading them if needed)."""
        modules = list(modules)
        self.start_reads(modules)
        for module in modules:
            unit = self._units.get(module)
            if unit is None:
                continue
            unit.free_after_write = False  # wanted again: keep it once its write is done
            for handle in unit.reads:
                handle.wait()
            unit.reads = []
            unit.resident = True

    def release(self, module: nn.Module) -> None:
        """Free a unit's shards, writing them first if they changed since their file was written."""
        unit = self._units.get(module)
        if unit is None or not self._ready:
            return
        if unit.reads:
            self.ensure([module])
        if not unit.resident:
            return
        if unit.dirty:
            self.write_back(module)
        unit.resident = False
        if unit.writes:
            unit.free_after_write = True
        else:
            _free(unit)

    def write_back(self, module: nn.Module) -> None:
        """Start writing a unit's shards to its files; memory stays until :meth:`release`."""
        unit = self._units[module]
        for handle in unit.writes:
            handle.wait()
        unit.writes = [self._swapper.swap_out(name, view) for name, view in zip(unit.names, unit.views, strict=True)]
        unit.dirty = False

    def _retire_writes(self, *, block: bool) -> None:
        for unit in self._units.values():
            if unit.writes and (block or all(h.done() for h in unit.writes)):
                for handle in unit.writes:
                    handle.wait()
                unit.writes = []
                if unit.free_after_write and not unit.resident:
                    _free(unit)
                unit.free_after_write = False

    def _write_all_files(self) -> None:
        for module, unit in self._units.items():
            if not all(storage.resizable() for storage in unit.storages):
                raise DsError("offload_param nvme frees parameter shards by resizing their storage, but these "
                              "cannot be resized (pinned by torch?); keep FSDP2's CPUOffloadPolicy unpinned.")
            self.write_back(module)
        self._retire_writes(block=True)

    def ensure_all(self) -> None:
        """Every unit in memory (checkpoints); the next forward or step releases them again."""
        self.ensure(self._units)

    def mark_all_changed(self) -> None:
        """The shards in memory were overwritten (a checkpoint load): release writes them first."""
        for unit in self._units.values():
            unit.dirty = True

    @contextmanager
    def holding(self, module: nn.Module) -> Iterator[None]:
        """One unit in memory for a while; released after unless it was already resident."""
        unit = self._units.get(module)
        was_resident = unit is None or unit.resident
        self.ensure([module])
        try:
            yield
        finally:
            if not was_resident:
                self.release(module)

    # -- the step ----------------------------------------------------------------------

    def step(self, optimizer_step: Callable[[], Any], trainable: Sequence[torch.Tensor]) -> None:
        """Run ``optimizer_step`` once per unit, seeing only that unit's gradients, then once for the rest.

        Every optimizer skips a parameter without a gradient (and leaves its ``step``
        count alone), so hiding the other units' gradients steps exactly one unit's
        shards per call with the same arithmetic as one call over all of them.
        """
        grads = {id(p): p.grad for p in trainable}
        in_unit = {id(p) for module in self._units for p in module.parameters()}
        sequence = _distinct([*self._reverse, *self._units]) if self._ready else []
        keep = set(_distinct(self._order[:1 + self._ahead]))
        try:
            for p in trainable:
                p.grad = None
            for position, module in enumerate(sequence):
                self.start_reads(sequence[position:position + 1 + self._ahead])
                self.ensure([module])
                if self._step_with(optimizer_step, [p for p in module.parameters() if id(p) in grads], grads):
                    self._units[module].dirty = True
                    if module in keep:
                        self.write_back(module)
                if module not in keep:
                    self.release(module)
            self._step_with(optimizer_step, [p for p in trainable if id(p) not in in_unit], grads)
        finally:
            for p in trainable:
                p.grad = grads[id(p)]
            self._retire_writes(block=True)

    @staticmethod
    def _step_with(optimizer_step: Callable[[], Any], params: list[torch.Tensor],
                   grads: dict[int, torch.Tensor | None]) -> bool:
        visible = [p for p in params if grads[id(p)] is not None]
        if not visible:
            return False
        for p in visible:
            p.grad = grads[id(p)]
        try:
            optimizer_step()
        finally:
            for p in visible:
                p.grad = None
        return True

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _free(unit: _Unit) -> None:
    for storage in unit.storages:
        storage.resize_(0)


def _close_and_remove(close: Callable[[], None], folder: Path) -> None:
    close()
    folder.rmdir()
