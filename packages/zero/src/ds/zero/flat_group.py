"""Parameters packed into one flat buffer of which every data-parallel rank owns a slice.

ZeRO stages 1 and 2 keep full compute-dtype parameters on every rank but split the
fp32 master weights, optimizer state (and for stage 2 the gradients) evenly. Packing a
bucket of parameters into one flat buffer padded to a multiple of the group size makes
each rank's slice contiguous, so gradient reduction is one reduce-scatter and the
parameter refresh after the step is one all-gather per bucket.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from ds.core.comm import CollectiveHandle
from ds.core.state_names import Segment

MasterFactory = Callable[[torch.Tensor], torch.Tensor]
"""Builds a rank's fp32 master slice from its compute-dtype slice of ``full``."""

# Parameter -> its group, for ds.zero.GatheredParameters; neither side keeps the other alive.
_GROUP_OF_PARAM: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


class FlatGroup:
    """One bucket: full params as views of ``full``; this rank's fp32 ``master`` slice."""

    def __init__(
        self,
        named_params: list[tuple[str, nn.Parameter]],
        *,
        world: int,
        rank: int,
        param_dtype: torch.dtype,
        device: torch.device,
        make_master: MasterFactory | None = None,
    ) -> None:
        self.names = [name for name, _ in named_params]
        self.params = [p for _, p in named_params]
        self.offsets: list[int] = []
        numel = 0
        for p in self.params:
            self.offsets.append(numel)
            numel += p.numel()
        self.numel = numel
        self.shard_numel = -(-numel // world)
        self.padded_numel = self.shard_numel * world
        self.rank = rank
        self.lo = rank * self.shard_numel
        self.hi = self.lo + self.shard_numel
        self.full = torch.zeros(self.padded_numel, dtype=param_dtype, device=device)
        with torch.no_grad():
            for p, offset in zip(self.params, self.offsets, strict=True):
                view = self.full[offset : offset + p.numel()].view_as(p)
                view.copy_(p.detach())
                p.data = view
                _GROUP_OF_PARAM[p] = weakref.ref(self)
        owned = self.full[self.lo : self.hi].detach()
        self.master = owned.float().clone() if make_master is None else make_master(owned)
        self.segments = list(self._segments())
        self._refresh: CollectiveHandle | None = None

    def _segments(self) -> Iterator[Segment]:
        for name, p, offset in zip(self.names, self.params, self.offsets, strict=True):
            start, stop = max(offset, self.lo), min(offset + p.numel(), self.hi)
            if start < stop:
                yield Segment(name, tuple(p.shape), start - offset, self.master, start - self.lo, stop - start)

    def param_views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Views of a full-size flat ``buffer`` shaped like each parameter."""
        return [buffer[o : o + p.numel()].view_as(p) for p, o in zip(self.params, self.offsets, strict=True)]

    @property
    def owned_slice(self) -> torch.Tensor:
        """This rank's slice of ``full``: the input of the in-place parameter all-gather."""
        return self.full[self.lo : self.hi]

    def refresh_owned_slice(self) -> None:
        """Write the updated master slice, in compute dtype, into this rank's slice of ``full``.

        Writing in place (rather than returning a converted copy) lets the all-gather read
        its input from its own output, so the refresh needs no temporary.
        """
        with torch.no_grad():
            self.owned_slice.copy_(self.master)

    def refresh_launched(self, handle: CollectiveHandle) -> None:
        """Record the all-gather now rewriting ``full``; every reader of ``full`` waits for it."""
        assert self._refresh is None, "wait_for_refresh before writing full again"
        self._refresh = handle

    def wait_for_refresh(self) -> None:
        """Return once ``full`` holds the stepped weights (on GPUs: once the current stream is ordered after them)."""
        handle, self._refresh = self._refresh, None
        if handle is not None:
            handle.wait()

    @property
    def refresh_pending(self) -> bool:
        return self._refresh is not None

    def __contains__(self, param: object) -> bool:
        return any(param is p for p in self.params)


def flat_group_of(param: torch.Tensor) -> tuple[FlatGroup, int] | None:
    """The flat group a stage 1/2 partitioner packed ``param`` into, and its index there."""
    ref = _GROUP_OF_PARAM.get(param)
    group = ref() if ref is not None else None
    return None if group is None else (group, next(i for i, p in enumerate(group.params) if p is param))


def build_flat_groups(
    named_params: list[tuple[str, nn.Parameter]],
    *,
    bucket_numel: int,
    world: int,
    rank: int,
    param_dtype: torch.dtype,
    device: torch.device,
    make_master: MasterFactory | None = None,
) -> list[FlatGroup]:
    """Cut parameters (in reverse registration order, the order backward produces
    gradients) into buckets of about ``bucket_numel`` elements."""
    buckets: list[list[tuple[str, nn.Parameter]]] = [[]]
    filled = 0
    for name, param in reversed(named_params):
        if buckets[-1] and filled + param.numel() > bucket_numel:
            buckets.append([])
            filled = 0
        buckets[-1].append((name, param))
        filled += param.numel()
    return [
        FlatGroup(bucket, world=world, rank=rank, param_dtype=param_dtype, device=device, make_master=make_master)
        for bucket in buckets
        if bucket
    ]
