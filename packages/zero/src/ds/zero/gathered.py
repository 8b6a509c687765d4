"""``ds.zero.GatheredParameters``: whole parameters for the length of a block.

    with ds.zero.GatheredParameters(model.embed.weight, modifier_rank=0) as weight:
        if rank == 0:
            weight[pad_id].zero_()        # weight: the whole tensor, a plain torch.Tensor
    # every rank's shard now holds rank 0's edit

A collective: every rank lists the same parameters in the same order. The block yields
the whole value of each parameter (one tensor for one parameter, else a list):

* a sharded parameter (a ``DTensor``: ZeRO stage 3, or a model built under
  :class:`ds.zero.Init`) is gathered; for the block the parameter object itself (the
  one modules, optimizer and FSDP hold) becomes a ``Replicate`` DTensor over that whole
  value, so ``param.to_local()``, ``param.full_tensor()`` and in-place DTensor ops on
  ``param`` see and change the yielded tensor. On exit it holds its shard again.
* a whole parameter (stages 0-2) is yielded as it is, with nothing gathered, once the
  last step's background refresh has written it (and an edit to it without
  ``modifier_rank`` stays on the rank that made it).

On exit with ``modifier_rank`` (a rank of the parameter's group: its mesh's for a
DTensor, ``group`` for whole parameters, default the world), that rank's whole values
are broadcast and every rank writes its part back: into its shard, or, for a parameter
packed in a stage 1/2 flat group, into the parameter and the elements of this rank's
fp32 master slice whose value changed, so the optimizer continues from the edit.
Without ``modifier_rank`` edits to gathered values are dropped.

Use it between optimizer steps, not around forward or backward: FSDP expects its
sharded parameters there. With stage 0 in bf16/fp16 the engine's fp32 master copies are
not refreshed; edit in fp32 or under ZeRO.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor._dtensor_spec import DTensorSpec

from ds.core.errors import DsError
from ds.zero.flat_group import flat_group_of
from ds.zero.init_layout import local_slice


@dataclass
class _Gathered:
    """A sharded parameter while it stands whole: what to put back on exit."""

    param: DTensor
    whole: torch.Tensor
    shard: torch.Tensor
    spec: DTensorSpec


class GatheredParameters:
    """Context manager giving whole parameters; see the module docstring."""

    def __init__(
        self,
        params: nn.Parameter | torch.Tensor | Iterable[nn.Parameter | torch.Tensor | None] | None,
        modifier_rank: int | None = None,
        enabled: bool = True,
        *,
        group: ProcessGroup | None = None,
    ) -> None:
        self._single = isinstance(params, torch.Tensor)
        listed = [params] if isinstance(params, torch.Tensor) else list(params or [])
        self._params: list[torch.Tensor] = [p for p in listed if p is not None]
        self._modifier_rank = modifier_rank
        self._enabled = enabled
        self._group = group
        self._gathered: list[_Gathered] = []

    def __enter__(self) -> Any:
        if not self._enabled:
            return self._result(self._params)
        seen: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for param in self._params:
                if id(param) not in seen:
                    seen[id(param)] = self._stand_whole(param) if isinstance(param, DTensor) else _refreshed(param)
        return self._result([seen[id(p)] for p in self._params])

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._enabled:
            return
        with torch.no_grad():
            try:
                if exc_type is None and self._modifier_rank is not None:
                    self._write_back()
            finally:
                for entry in self._gathered:
                    entry.param._local_tensor = entry.shard
                    entry.param._spec = entry.spec
                self._gathered = []

    def _result(self, tensors: list[torch.Tensor]) -> Any:
        return tensors[0] if self._single else tensors

    def _stand_whole(self, param: DTensor) -> torch.Tensor:
        whole = param.full_tensor().detach()
        spec = param._spec
        self._gathered.append(_Gathered(param, whole, param._local_tensor, spec))
        mesh = param.device_mesh
        param._spec = DTensorSpec(mesh, (Replicate(),) * mesh.ndim, tensor_meta=spec.tensor_meta)
        param._local_tensor = whole
        return whole

    # -- write-back -------------------------------------------------------------------

    def _write_back(self) -> None:
        gathered = {id(entry.param) for entry in self._gathered}
        for entry in self._gathered:
            mesh = entry.param.device_mesh
            if mesh.ndim != 1:
                raise DsError(
                    f"GatheredParameters(modifier_rank=...) writes back only parameters sharded on a 1-D mesh; "
                    f"this one lives on mesh dims {mesh.mesh_dim_names}. Edit it without modifier_rank."
                )
            self._broadcast(entry.whole, mesh.get_group())
            entry.shard.copy_(local_slice(entry.whole, mesh, entry.spec.placements))
        for param in {id(p): p for p in self._params if id(p) not in gathered}.values():
            self._broadcast(param.data, self._group)
            _refresh_master(param)

    def _broadcast(self, tensor: torch.Tensor, group: ProcessGroup | None) -> None:
        size = dist.get_world_size(group) if dist.is_initialized() else 1
        assert self._modifier_rank is not None
        if not 0 <= self._modifier_rank < size:
            raise DsError(
                f"modifier_rank={self._modifier_rank} is not a rank of the parameter's group of {size} "
                f"ranks; pass a rank in 0..{size - 1}."
            )
        if size > 1:
            src = self._modifier_rank if group is None else dist.get_global_rank(group, self._modifier_rank)
            dist.broadcast(tensor, src=src, group=group)


def _refreshed(param: torch.Tensor) -> torch.Tensor:
    """A stage 1/2 parameter once the all-gather of the last step has written it."""
    found = flat_group_of(param)
    if found is not None:
        found[0].wait_for_refresh()
    return param


def _refresh_master(param: torch.Tensor) -> None:
    """Copy an edited whole parameter into the fp32 master slice its flat group owns here."""
    found = flat_group_of(param)
    if found is None:
        return
    group, index = found
    offset = group.offsets[index]
    start, stop = max(offset, group.lo), min(offset + param.numel(), group.hi)
    if start >= stop:
        return
    master = group.master[start - group.lo : stop - group.lo]
    edited = group.full[start:stop].to(master.device)  # masters may be offloaded to the CPU
    # Only changed elements: an untouched fp32 master keeps its precision under bf16/fp16.
    changed = master.to(edited.dtype) != edited
    master[changed] = edited[changed].to(master.dtype)
