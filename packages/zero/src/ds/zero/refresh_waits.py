"""Stages 1 and 2: the next forward waits for each block's refreshed parameters, not all.

After the optimizer step every rank all-gathers the stepped compute-dtype parameters
from the owned slices. Waiting for every bucket inside ``step`` leaves the GPU idle for
the whole transfer (about 1.3 GB per rank for a 1.3B model on two GPUs: several
milliseconds a step). With ``overlap_comm`` the gathers run in the background instead,
and a forward pre-hook on each block (:func:`~ds.zero.units.shard_units`) waits only
for the buckets holding that block's parameters, so the first layers compute while the
later layers' weights arrive. Modules outside every block (embeddings, the final norm,
the LM head) wait for their own parameters' buckets.

Other readers of the full parameters wait too: ``state_dict`` (a pre-hook on the root),
:class:`ds.zero.GatheredParameters`, checkpoint loading and the next step. Code that
reads ``param.data`` directly between ``step`` and the next forward should call
:meth:`~ds.zero.flat_group.FlatGroup.wait_for_refresh` (or set ``overlap_comm: false``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ds.zero.flat_group import FlatGroup
from ds.zero.units import shard_units


def register_refresh_waits(root: nn.Module, groups: Sequence[FlatGroup]) -> list[RemovableHandle]:
    """Make every module's forward wait for the refresh of the buckets holding its parameters."""
    group_of = {id(p): g for g in groups for p in g.params}

    def groups_holding(params: Iterable[nn.Parameter]) -> list[FlatGroup]:
        found = {id(group_of[id(p)]): group_of[id(p)] for p in params if id(p) in group_of}
        return list(found.values())

    handles = []
    units = shard_units(root)
    inside_units = {id(m) for unit in units for m in unit.modules()}
    for unit in units:
        handles.append(unit.register_forward_pre_hook(_waiter(groups_holding(unit.parameters()))))
    for module in root.modules():
        if id(module) in inside_units:
            continue
        # A parameter tied into a block (an LM head sharing the embedding) is waited for here too.
        own = groups_holding(module.parameters(recurse=False))
        if own:
            handles.append(module.register_forward_pre_hook(_waiter(own)))
    every = list(groups)
    handles.append(root.register_state_dict_pre_hook(lambda *_: _wait_all(every)))
    return handles


def _wait_all(groups: Iterable[FlatGroup]) -> None:
    for group in groups:
        group.wait_for_refresh()


def _waiter(groups: list[FlatGroup]) -> Callable[[nn.Module, Any], None]:
    # Outside torch.compile's graph: the wait is a host-side decision (is a gather still
    # pending?) that must run on every call, and an in-place compiled block would
    # otherwise trace it once and bake in the answer.
    @torch._dynamo.disable
    def wait(module: nn.Module, args: Any) -> None:  # noqa: ARG001 - forward pre-hook signature
        _wait_all(groups)

    return wait
