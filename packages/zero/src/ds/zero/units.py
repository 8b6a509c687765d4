"""The model's repeated blocks, the granularity at which ZeRO communicates parameters.

Stage 3 all-gathers one block at a time; stages 1 and 2 let each block wait only for
the refreshed parameters it holds (:mod:`ds.zero.refresh_waits`). Both want the same
blocks: the members of the model's ``nn.ModuleList``/``nn.Sequential`` containers (the
decoder layers of a transformer), or the root's children when it has no container.
"""

from __future__ import annotations

from torch import nn


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The modules that get one all-gather each, in forward order when registration order is."""
    units: list[nn.Module] = []
    for child in module.modules():
        if isinstance(child, (nn.ModuleList, nn.Sequential)) and child is not module:
            units.extend(c for c in child.children() if any(p.requires_grad for p in c.parameters()))
    if not units:
        units = [c for c in module.children() if any(p.requires_grad for p in c.parameters())]
    nested = {id(m) for u in units for m in u.modules() if m is not u}
    distinct: dict[int, nn.Module] = {}  # a block listed by two containers counts once
    for unit in units:
        if id(unit) not in nested:
            distinct.setdefault(id(unit), unit)
    return list(distinct.values())
