"""Stage 3's CPU-offloaded shards gathered into one host buffer per FSDP2 unit.

FSDP2 keeps each offloaded parameter shard in its own CPU tensor and, with
``pin_memory``, pins each one through torch's pinned allocator, which rounds every
block up to a power of two: a 1.3B Llama's 45 MB fp32 MLP shards lock 64 MiB each, a
13B's 283 MB ones 512 MiB, so the parameters alone lock up to nearly twice their size. Here
each unit's shards move into one buffer of exactly their total size, page-locked at
that size (:func:`ds.zero.host_memory.page_locked_empty`) when pinning is asked for,
and FSDP2 is told they are pinned so it copies the gradients out asynchronously.

One storage per unit also serves the disk offload (:mod:`ds.zero.param_swap`), which
frees and refills a unit's memory by its storages: there the buffer stays pageable,
since page-locked storage cannot be resized.

Reads FSDP2's private per-parameter state (torch 2.11-2.13): ``_sharded_param_data``
is the padded 1-D buffer FSDP2 copies to the device for the all-gather, and the
parameter's local tensor is its unpadded front.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ds.core.errors import DsError
from ds.zero.host_memory import host_empty


def fsdp_params(unit: nn.Module) -> list[Any]:
    """The ``FSDPParam`` objects of the parameters ``fully_shard(unit)`` manages."""
    state = unit._get_fsdp_state()  # type: ignore[operator]
    # torch 2.11 keeps one optional group (``_fsdp_param_group``), later versions a list.
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        groups = [state._fsdp_param_group] if state._fsdp_param_group is not None else []
    return [fsdp_param for group in groups for fsdp_param in group.fsdp_params]


def fsdp_reads_local_shard(unit: nn.Module) -> bool:
    """Whether FSDP2's all-gather of ``unit`` reads the storage of each parameter's local
    shard, the memory the optimizer updates (and the disk offload frees and refills)."""
    return all(_reads_local_shard(fsdp_param) for fsdp_param in fsdp_params(unit))


def _reads_local_shard(fsdp_param: Any) -> bool:
    shard = fsdp_param.sharded_param.to_local()
    buffer = fsdp_param._sharded_param_data
    return not shard.numel() or buffer.untyped_storage().data_ptr() == shard.untyped_storage().data_ptr()


class HostShards:
    """Every unit's offloaded shards in one host buffer per unit and dtype.

    FSDP2 is told that the shards are pinned only after its lazy initialisation (the root's
    first forward). Told before, a 1.3B model built under ``ds.zero.Init`` kept its initial
    loss on an H100 (10.78 after 6 steps against 3.37), while small test models trained
    normally. That initialisation runs torch's ``reset_sharded_param``, which copies a shard
    that does not report ``is_pinned()`` into torch's pool and points the parameter, but not
    the buffer the all-gather reads, at the copy: the optimizer would then update memory the
    forward never sees.
    """

    def __init__(self, root: nn.Module, units: Iterable[nn.Module], *, pin: bool) -> None:
        self._members: list[Any] = []
        # Held here: a page-locked buffer is unlocked when its tensor object goes.
        self.buffers: list[torch.Tensor] = []
        for unit in units:
            by_dtype: dict[torch.dtype, list[Any]] = {}
            for fsdp_param in fsdp_params(unit):
                # Picks up a parameter swapped in since fully_shard (ds.zero.Init's shards) and
                # pads it, as FSDP2's lazy initialisation would; that initialisation then finds
                # the data where this leaves it and keeps it there.
                fsdp_param.reset_sharded_param()
                on_host = fsdp_param._sharded_param_data.device.type == "cpu"
                if on_host and fsdp_param.fsdp_placement.dim == 0:  # ds shards dim 0; others keep theirs
                    by_dtype.setdefault(fsdp_param._sharded_param_data.dtype, []).append(fsdp_param)
            for dtype, members in by_dtype.items():
                numel = sum(p._sharded_param_data.numel() for p in members)
                self.buffers.append(_gather(members, host_empty(numel, dtype, pin=pin)))
                self._members += members
        self._pin = pin
        self._handle: RemovableHandle | None = root.register_forward_pre_hook(self._after_lazy_init)

    def _after_lazy_init(self, module: nn.Module, args: Any) -> None:
        """At the first forward, after FSDP2's lazy initialisation re-read every shard: check that
        it kept them in place, then let its copies to and from pinned shards be asynchronous."""
        for fsdp_param in self._members:
            if not _reads_local_shard(fsdp_param):  # training would silently stop learning
                name = fsdp_param._param_fqn or "a parameter"
                raise DsError(
                    f"FSDP2 (torch {torch.__version__}) moved the offloaded shard of {name} away from the buffer "
                    "its all-gather reads, so optimizer updates would never reach the forward. Setting "
                    "pin_memory: false in offload_optimizer/offload_param may avoid it; please report this."
                )
            fsdp_param.pin_memory = self._pin
        assert self._handle is not None
        self._handle.remove()
        self._handle = None


def _gather(members: list[Any], buffer: torch.Tensor) -> torch.Tensor:
    offset = 0
    for fsdp_param in members:
        old = fsdp_param._sharded_param_data
        new = buffer[offset : offset + old.numel()]
        new.copy_(old)
        local = fsdp_param.sharded_param._local_tensor
        length = local.size(0) if local.numel() else 0
        fsdp_param._sharded_param_data = new
        fsdp_param.sharded_param._local_tensor = new.view(fsdp_param.padded_sharded_param_size).narrow(0, 0, length)
        offset += old.numel()
    return buffer
