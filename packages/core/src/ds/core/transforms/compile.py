"""``compile.enabled``: ``torch.compile`` each repeated block of the model, in place.

Compiling block by block rather than the whole model keeps compile time to one graph
for a stack of identical layers (torch reuses it across them) and keeps graph
boundaries where ZeRO stage 3 puts its all-gathers: the blocks are picked by the same
rule as ds-zero's shard units (every child of an ``nn.ModuleList`` or ``nn.Sequential``
that has trainable parameters and is not inside another such child; failing that, the
model's own children with trainable parameters), so each FSDP2 unit is one compiled
region and its hooks stay outside the graph.

``nn.Module.compile`` compiles the module's call in place: the module object, its
parameter names and its place in the model are unchanged, so ``fully_shard`` per block,
checkpoints and kernel injection (which runs before, at order 600) keep working.
Compilation itself is lazy, on the first forward.

A Hugging Face model whose ``config.use_cache`` is on gets it switched off: a training
step needs no KV cache, and the cache's per-layer index would make every block compile
a graph of its own (beyond ``torch._dynamo.config.recompile_limit`` blocks, silently
not at all). ``generate()`` still uses a cache, since it asks for one itself.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from ds.core.config import CompileConfig, DsConfig
    from ds.core.partition import PartitionContext

logger = logging.getLogger(__name__)


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks a model repeats, outermost first, each once (ds-zero stage 3's shard-unit rule)."""
    blocks: list[nn.Module] = []
    for container in model.modules():
        if isinstance(container, (nn.ModuleList, nn.Sequential)) and container is not model:
            blocks.extend(c for c in container.children() if _trainable(c))
    if not blocks:
        blocks = [c for c in model.children() if _trainable(c)]
    nested = {id(m) for block in blocks for m in block.modules() if m is not block}
    unique: dict[int, nn.Module] = {}
    for block in blocks:
        if id(block) not in nested:
            unique.setdefault(id(block), block)
    return list(unique.values())


def compile_blocks(model: nn.Module, settings: CompileConfig) -> list[nn.Module]:
    """Compile each of ``model``'s repeated blocks in place (the model itself when it has none)."""
    model_config = getattr(model, "config", None)
    if getattr(model_config, "use_cache", False):
        model_config.use_cache = False
        logger.info("torch.compile: %s's config.use_cache switched off for training", type(model).__name__)
    blocks = repeated_blocks(model) or [model]
    for block in blocks:
        block.compile(backend=settings.backend, mode=settings.mode, fullgraph=settings.fullgraph,
                      dynamic=settings.dynamic)
    return blocks


class CompileBlocks:
    """``compile.enabled``: torch.compile each repeated block after every other rewrite."""

    name = "compile-blocks"
    order = 700

    def applies(self, config: DsConfig) -> bool:
        return config.compile.enabled

    def apply(self, module: nn.Module, context: PartitionContext) -> nn.Module:
        blocks = compile_blocks(module, context.config.compile)
        kinds = sorted({type(b).__name__ for b in blocks})
        logger.info("torch.compile (%s) of %d blocks: %s", context.config.compile.backend, len(blocks),
                    ", ".join(kinds))
        return module
