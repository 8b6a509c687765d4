"""The layout :class:`ds.zero.Init` gives parameters, and how the partitioners meet it.

Init leaves every parameter with at least one dimension as a ``DTensor`` placed
``Shard(0)`` on a 1-D device mesh named ``dp``. ZeRO stage 3 adopts those shards without
gathering them: :func:`release_init_shards` swaps them for ``meta`` placeholders before
``fully_shard`` (which accepts meta parameters and shards their metadata like any
other), :func:`adopt_init_shards` puts them into ``fully_shard``'s sharded parameters
after. Stages 0-2 keep whole parameters and cannot take them: :class:`InitLayoutCheck`
says so at composition.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ds.core.errors import ConfigError, DsError

if TYPE_CHECKING:
    from ds.core.config import DsConfig
    from ds.core.partition import PartitionContext

DP_DIM = "dp"


def local_slice(whole: torch.Tensor, mesh: DeviceMesh, placements: tuple[Any, ...]) -> torch.Tensor:
    """The piece of ``whole`` this rank holds under ``placements`` (a view)."""
    shape, offset = compute_local_shape_and_global_offset(whole.shape, mesh, placements)
    piece = whole
    for dim, (start, length) in enumerate(zip(offset, shape, strict=True)):
        if length != whole.shape[dim]:
            piece = piece.narrow(dim, start, length)
    return piece


def is_init_sharded(param: torch.Tensor) -> bool:
    """Whether ``param`` has Init's layout: ``Shard(0)`` on a 1-D mesh named ``dp``."""
    return (
        isinstance(param, DTensor)
        and param.device_mesh.mesh_dim_names == (DP_DIM,)
        and tuple(param.placements) == (Shard(0),)
    )


class InitLayoutCheck:
    """Model transform: a model built under :class:`Init` given to a stage that keeps
    whole parameters (0-2) fails here, by name, not inside a broadcast of a shard."""

    name = "zero-init-layout-check"
    order = 0  # before every rewrite

    def applies(self, config: DsConfig) -> bool:
        return zero_stage(config) != 3

    def apply(self, module: nn.Module, context: PartitionContext) -> nn.Module:
        sharded = [name for name, p in module.named_parameters() if is_init_sharded(p)]
        if sharded:
            raise ConfigError(
                f"the model was built under ds.zero.Init, which shards its parameters ({sharded[0]}, ...) for "
                f"ZeRO stage 3, but zero_optimization.stage is {zero_stage(context.config)}. Set stage 3, or "
                "pass the run's config to ds.zero.Init, which then builds whole parameters."
            )
        return module


def release_init_shards(module: nn.Module, dp_mesh: DeviceMesh) -> dict[str, torch.Tensor]:
    """Swap Init's sharded parameters for ``meta`` placeholders ``fully_shard`` accepts.

    Returns each released parameter's local shard by fully qualified name, for
    :func:`adopt_init_shards` once ``fully_shard`` has set up its own sharded parameters.
    Raises if the shards were cut for other ranks than ``dp_mesh``'s.
    """
    expected = dp_mesh.mesh.flatten().tolist()
    shards: dict[str, torch.Tensor] = {}
    placeholders: dict[int, nn.Parameter] = {}
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for name, param in list(owner._parameters.items()):
            if param is None or not is_init_sharded(param):
                continue
            if id(param) not in placeholders:
                built_for = param.device_mesh.mesh.flatten().tolist()
                if built_for != expected:
                    raise ConfigError(
                        f"parameter {prefix + '.' + name if prefix else name} was sharded by ds.zero.Init "
                        f"over ranks {built_for}, but ZeRO stage 3 shards over the data-parallel ranks "
                        f"{expected}; pass the run's config (or its mesh) to ds.zero.Init."
                    )
                shards[f"{prefix}.{name}" if prefix else name] = param.to_local()
                meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
                placeholders[id(param)] = nn.Parameter(meta, requires_grad=param.requires_grad)
            owner._parameters[name] = placeholders[id(param)]
    return shards


def adopt_init_shards(module: nn.Module, shards: dict[str, torch.Tensor], *, offload_to_cpu: bool) -> None:
    """Put the shards :func:`release_init_shards` kept into ``fully_shard``'s parameters.

    ``fully_shard`` made a sharded ``DTensor`` with empty (meta) storage for each
    placeholder; it is replaced by one over the kept shard, which FSDP picks up at its
    lazy initialisation as it does after ``to_empty``. Under FSDP2's CPU offload the
    shards must be CPU tensors by then (its lazy initialisation refuses device ones), so
    ``offload_to_cpu`` copies each one into a host shard as it is adopted.
    """
    for fqn, local in shards.items():
        owner_name, _, name = fqn.rpartition(".")
        owner = module.get_submodule(owner_name)
        sharded = owner._parameters[name]
        assert isinstance(sharded, DTensor)
        expected = sharded.to_local().shape
        if local.shape != expected:
            raise DsError(
                f"ds.zero.Init's shard of {fqn} has shape {tuple(local.shape)} but fully_shard expects "
                f"{tuple(expected)}; torch changed how it chunks parameters, please report this."
            )
        if offload_to_cpu:
            # DTensor.from_local would move the shard to the mesh's device; empty_like with a
            # device keeps it on the host, as module.to_empty(device="cpu") does for FSDP2.
            adopted = torch.empty_like(sharded, device="cpu")
            with torch.no_grad():
                adopted.to_local().copy_(local)
        else:
            adopted = DTensor.from_local(
                local.to(dtype=sharded.dtype), sharded.device_mesh, sharded.placements,
                run_check=False, shape=sharded.shape, stride=sharded.stride(),
            )
        replacement = nn.Parameter(adopted, requires_grad=sharded.requires_grad)
        for holder, slot in _slots_holding(module.modules(), sharded):
            holder._parameters[slot] = replacement


def _slots_holding(modules: Iterable[nn.Module], param: torch.Tensor) -> list[tuple[nn.Module, str]]:
    """Every (module, name) that registers ``param``: tied weights have several."""
    return [(m, name) for m in modules for name, p in m._parameters.items() if p is param]


def zero_stage(config: DsConfig) -> int:
    section = config.section("zero_optimization")
    return int(section.stage) if section is not None else 0  # type: ignore[attr-defined]
