"""ds-zero's hook implementations for the ZeRO stages (re-exported by ``ds.zero.plugin``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ds.core import hookimpl
from ds.core.partition import PartitionContext, Partitioner
from ds.zero.config import ZeroConfig

SECTION = "zero_optimization"


def _zero(context: PartitionContext) -> ZeroConfig:
    return context.config.section(SECTION) or ZeroConfig()


def stage1(context: PartitionContext) -> Partitioner:
    from ds.zero.stage12 import ShardedOptimizerPartitioner

    return ShardedOptimizerPartitioner(context, _zero(context), shard_gradients=False)


def stage2(context: PartitionContext) -> Partitioner:
    from ds.zero.stage12 import ShardedOptimizerPartitioner

    return ShardedOptimizerPartitioner(context, _zero(context), shard_gradients=True)


def stage3(context: PartitionContext) -> Partitioner:
    from ds.zero.stage3 import FullyShardedPartitioner

    return FullyShardedPartitioner(context, _zero(context))


@hookimpl
def ds_register_config_sections(register: Callable[..., None]) -> None:
    register(SECTION, ZeroConfig)


@hookimpl
def ds_register_partitioners(register: Callable[..., None]) -> None:
    register("zero-1", stage1)
    register("zero-2", stage2)
    register("zero-3", stage3)


@hookimpl
def ds_choose_partitioner(config: Any) -> str | None:
    zero = config.section(SECTION)
    if zero is None or zero.stage == 0:
        return None
    return f"zero-{zero.stage}"


@hookimpl
def ds_register_model_transforms(register: Callable[..., None]) -> None:
    from ds.zero.init_layout import InitLayoutCheck

    register(InitLayoutCheck())
