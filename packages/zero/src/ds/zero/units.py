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
    seen: set[int] = set()
    nested = {id(m) for u in units for m in u.modules() if m is not u}
    return [u for u in units if id(u) not in nested and not (id(u) in seen or seen.add(id(u)))]
