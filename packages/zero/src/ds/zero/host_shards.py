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

from ds.zero.host_memory import host_empty


def fsdp_params(unit: nn.Module) -> list[Any]:
    """The ``FSDPParam`` objects of the parameters ``fully_shard(unit)`` manages."""
    state = unit._get_fsdp_state()  # type: ignore[operator]
    # torch 2.11 keeps one optional group (``_fsdp_param_group``), later versions a list.
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        groups = [state._fsdp_param_group] if state._fsdp_param_group is not None else []
    return [fsdp_param for group in groups for fsdp_param in group.fsdp_params]


def gather_host_shards(units: Iterable[nn.Module], *, pin: bool) -> list[torch.Tensor]:
    """Move every unit's offloaded shards into one buffer per unit and dtype; returns the buffers.

    The caller keeps the returned buffers alive: a page-locked buffer is unlocked when its
    tensor object goes (its views keep the memory, unlocked). torch's ``is_pinned`` sees
    registered memory as pinned, so FSDP2's lazy initialisation leaves the shards there.
    """
    buffers: list[torch.Tensor] = []
    for unit in units:
        by_dtype: dict[torch.dtype, list[Any]] = {}
        for fsdp_param in fsdp_params(unit):
            # Picks up a parameter swapped in since fully_shard (ds.zero.Init's shards) and pads
            # it, as FSDP2's lazy initialisation would; that initialisation then finds the data
            # where this leaves it and keeps it there.
            fsdp_param.reset_sharded_param()
            on_host = fsdp_param._sharded_param_data.device.type == "cpu"
            if on_host and fsdp_param.fsdp_placement.dim == 0:  # ds shards dim 0; others keep theirs
                by_dtype.setdefault(fsdp_param._sharded_param_data.dtype, []).append(fsdp_param)
        for dtype, members in by_dtype.items():
            buffers.append(_gather(members, host_empty(sum(_padded_numel(p) for p in members), dtype, pin=pin)))
            for fsdp_param in members:
                fsdp_param.pin_memory = pin  # FSDP2 then copies the gradients out asynchronously
    return buffers


def _padded_numel(fsdp_param: Any) -> int:
    return fsdp_param._sharded_param_data.numel()


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
