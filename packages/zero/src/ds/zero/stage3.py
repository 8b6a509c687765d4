"""ZeRO stage 3 on torch's ``fully_shard`` (FSDP2): parameters, gradients and optimizer
state all sharded, parameters gathered per module just before use.

Why FSDP2 rather than per-parameter Python hooks (DeepSpeed's way): it gathers whole
modules with one all-gather each, keeps the per-step path free of host syncs, overlaps
communication on separate streams, and represents shards as DTensors, which is the
representation DESIGN.md fixes. ds adds DeepSpeed's configuration and semantics:

* shard units: every child of an ``nn.ModuleList``/``nn.Sequential`` holding the model's
  repeated blocks, else every direct child; the root holds what is left;
* ``stage3_param_persistence_threshold``: a unit with fewer parameters stays gathered
  from forward through backward instead of being freed and gathered again;
* ``stage3_prefetch_bucket_size`` and ``stage3_max_live_parameters``: how many units
  ahead forward and backward prefetch (at least one). The first step prefetches forward
  in registration order; its forward order is traced and replayed from the second step
  on (:mod:`ds.zero.stage3_trace`);
* accumulation windows skip the reduce-scatter until their last micro-step;
* ZeRO++ (:mod:`ds.zero.zeropp`): hpZ through FSDP2's ``reshard_after_forward=<int>``,
  qwZ and qgZ as FSDP2 custom all-gather and reduce-scatter;
* ``offload_optimizer`` (device ``cpu`` or ``nvme``) or ``offload_param`` (``cpu``):
  FSDP2's ``CPUOffloadPolicy``, under which the sharded fp32 parameters, their gradients
  and the optimizer state all live on the CPU (FSDP2 cannot keep parameters on the
  device while the optimizer runs on the CPU, so either key asks for both). The step
  runs as ds-zero's CPU Adam/AdamW/Adagrad on each DTensor's local shard
  (:func:`ds.zero.offload.build_host_optimizer`); with ``nvme`` Adam's moments of each
  local shard live in files and stream through the step. No bf16 copy is written in
  the step: FSDP2 casts the fp32 shard while copying it into its all-gather buffer.
  Each unit's shards share one host buffer, page-locked at its exact size with
  ``pin_memory`` (:mod:`ds.zero.host_shards`);
* ``offload_param: {device: nvme}`` (ZeRO-Infinity): as with ``cpu``, and the shard units'
  CPU shards live in files between uses, so the host holds a window of ``1 + 2 * ahead``
  units in forward and backward instead of the whole model; the step streams one unit
  at a time through the host optimizer (:mod:`ds.zero.param_swap`). The optimizer state
  stays in memory unless ``offload_optimizer`` puts it on disk too. Checkpoint saves and
  loads bring every unit into memory once (the next forward or step releases them).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ds.core.partition import PartitionContext, Partitioner, broadcast_module_from_first_rank, scale_gradients
from ds.core.state_names import (
    Segment,
    load_masters,
    load_optimizer_state,
    local,
    master_shards,
    named_trainable_parameters,
    optimizer_state_shards,
)
from ds.zero.disk_adam import moments_in_memory, store_loaded_moments
from ds.zero.host_memory import pin_host_memory
from ds.zero.host_shards import HostShards
from ds.zero.init_layout import adopt_init_shards, release_init_shards
from ds.zero.offload import build_host_optimizer
from ds.zero.param_swap import ParamSwap
from ds.zero.stage3_trace import ForwardOrderTrace, PrefetchPlan, apply_prefetch_plan, prefetch_plan, prefetch_window
from ds.zero.swap import SwapConfig
from ds.zero.units import shard_units
from ds.zero.zeropp import ZeroPlusPlus

if TYPE_CHECKING:
    from ds.core.checkpoint import CheckpointReader, TensorShard
    from ds.zero.config import OffloadConfig, ZeroConfig


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _host_offload(zero: ZeroConfig) -> OffloadConfig | None:
    """The offload section the host optimizer follows (optimizer's first), or None.

    Parameters on disk alone keep the optimizer state in memory, as ``offload_param: cpu``
    does: the moments go to disk only where ``offload_optimizer`` asks for it.
    """
    if zero.offload_optimizer.device != "none":
        return zero.offload_optimizer
    if zero.offload_param.device != "none":
        return zero.offload_param.model_copy(update={"device": "cpu"})
    return None


def _param_swap(module: nn.Module, units: list[nn.Module], zero: ZeroConfig, rank: int, ahead: int) -> ParamSwap | None:
    """ZeRO-Infinity's parameter offload when ``offload_param.device`` is nvme, else None."""
    offload = zero.offload_param
    if offload.device != "nvme" or not units:
        return None
    assert offload.nvme_path is not None  # the config requires it
    config = SwapConfig(buffer_count=offload.buffer_count, pin_memory=pin_host_memory(offload))
    return ParamSwap(module, units, nvme_path=offload.nvme_path, rank=rank, ahead=ahead, config=config)


def _offloads(zero: ZeroConfig) -> list[OffloadConfig]:
    return [o for o in (zero.offload_optimizer, zero.offload_param) if o.device != "none"]


def _offload_policy(zero: ZeroConfig) -> OffloadPolicy:
    # Never FSDP2's own pinning, which rounds each shard up to a power of two: pinned
    # shards are page-locked per unit at their exact size by HostShards.
    return CPUOffloadPolicy(pin_memory=False) if _offloads(zero) else OffloadPolicy()


def _pins_shards(zero: ZeroConfig) -> bool:
    """Whether the offloaded shards are page-locked. Shards on disk are freed by resizing
    their storage, which locked memory refuses: there pin_memory pins the swap's I/O buffers only."""
    return zero.offload_param.device != "nvme" and any(pin_host_memory(o) for o in _offloads(zero))


def _units_ahead(units: list[nn.Module], zero: ZeroConfig) -> int:
    """How many units the prefetch budget covers, at the average unit size (at least one)."""
    per_unit = max(1, sum(_numel(u) for u in units) // max(1, len(units)))
    budget = min(int(zero.stage3_prefetch_bucket_size), int(zero.stage3_max_live_parameters))
    return max(1, budget // per_unit)


class FullyShardedPartitioner(Partitioner):
    """ZeRO stage 3: every rank holds ``1/N`` of parameters, gradients and optimizer state."""

    def __init__(self, context: PartitionContext, zero: ZeroConfig) -> None:
        self._comm = context.comm
        self._group = context.mesh.group("dp")
        precision = context.precision
        module = context.module.to(device=context.device, dtype=precision.master_dtype)
        user_groups = context.param_groups or [{"params": [p for p in module.parameters() if p.requires_grad]}]
        names_of = {id(p): n for n, p in named_trainable_parameters(module)}
        group_names = [[names_of[id(p)] for p in g["params"] if id(p) in names_of] for g in user_groups]
        init_shards = release_init_shards(module, context.mesh.submesh("dp"))  # built by ds.zero.Init
        broadcast_module_from_first_rank(self._comm, self._group, module)

        mesh = context.mesh.submesh("dp")
        policy = MixedPrecisionPolicy(param_dtype=precision.param_dtype, reduce_dtype=precision.reduce_dtype)
        threshold = int(zero.stage3_param_persistence_threshold)
        zeropp = ZeroPlusPlus.from_config(zero, mesh.size())
        units = shard_units(module)
        offload = _offload_policy(zero)
        for unit in units:
            reshard = zeropp.reshard_after_forward(_numel(unit) >= threshold)
            fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard, offload_policy=offload)
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=False, offload_policy=offload)
        on_host = isinstance(offload, CPUOffloadPolicy)
        adopt_init_shards(module, init_shards, offload_to_cpu=on_host)
        # Registered after fully_shard, so its first-forward hook runs after FSDP2's lazy init.
        self._host_shards = HostShards(module, [*units, module], pin=_pins_shards(zero)) if on_host else None
        zeropp.install_fsdp_collectives([*units, module], self._comm)
        self._units = units
        self._ahead = _units_ahead(units, zero)
        # Until the first forward is traced: forward prefetch by registration order,
        # backward by FSDP2's default (reverse post-forward order).
        self.prefetch = PrefetchPlan(tuple(units), prefetch_window(units, self._ahead), {})
        """The prefetch lists in force; ``order`` is the traced forward order once the first step ended."""
        apply_prefetch_plan(self.prefetch, units)
        # Registered after fully_shard, so its hooks can run before FSDP2's.
        self._param_swap = _param_swap(module, units, zero, context.comm.rank, self._ahead)
        self._trace: ForwardOrderTrace | None = ForwardOrderTrace(module, units) if len(units) > 1 else None
        self.module = module
        self._root: FSDPModule = module  # type: ignore[assignment]

        self._named = named_trainable_parameters(module)
        by_name = dict(self._named)
        groups = [{**g, "params": [by_name[n] for n in names]}
                  for g, names in zip(user_groups, group_names, strict=True)]
        host = _host_offload(zero)
        self.optimizer = (
            context.make_optimizer(groups) if host is None
            else build_host_optimizer(context.make_optimizer, groups, host, context.comm.rank)
        )
        self._segments = [self._segment(name, p) for name, p in self._named]
        self.gradient_norm_group = self._group

    @staticmethod
    def _segment(name: str, param: torch.Tensor) -> Segment:
        assert isinstance(param, DTensor)
        local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        row = 1
        for size in param.shape[1:]:
            row *= size
        numel = 1
        for size in local_shape:
            numel *= size
        flat_offset = offset[0] * row if param.dim() > 0 else 0
        return Segment(name, tuple(param.shape), flat_offset, param, 0, numel)

    # -- gradients ------------------------------------------------------------------

    def set_gradient_sync(self, enabled: bool) -> None:
        self._root.set_requires_gradient_sync(enabled)

    def finish_gradient_sync(self) -> None:
        """FSDP2 waits for its reduce-scatters at the end of backward; nothing is pending."""

    def owned_gradients(self) -> list[torch.Tensor]:
        return [local(p.grad) for _, p in self._named if p.grad is not None]

    def step(self, grad_scale: float = 1.0) -> None:
        scale_gradients(self.owned_gradients(), grad_scale)
        if self._param_swap is None:
            self.optimizer.step()
        else:
            self._param_swap.step(self.optimizer.step, [p for _, p in self._named])

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self._trace is not None and self._trace.order:
            self._replay_traced_order(self._trace)

    def _replay_traced_order(self, trace: ForwardOrderTrace) -> None:
        """After the first step's forward: prefetch in the order the units really ran."""
        self.prefetch = prefetch_plan(trace.order, self._ahead)
        apply_prefetch_plan(self.prefetch, self._units)
        if self._param_swap is not None:
            self._param_swap.use_order(self.prefetch.order)
        trace.remove()
        self._trace = None

    # -- checkpoints and accounting -------------------------------------------------------

    def checkpoint_shards(self) -> list[TensorShard]:
        if self._param_swap is not None:  # the shards are written after this returns; the next use releases them
            self._param_swap.ensure_all()
        with moments_in_memory(self.optimizer):
            return master_shards(self._segments) + optimizer_state_shards(self.optimizer, self._segments)

    def load_checkpoint(self, reader: CheckpointReader) -> None:
        if self._param_swap is not None:  # frozen parameters are loaded after this returns
            self._param_swap.ensure_all()
            self._param_swap.mark_all_changed()
        load_masters(reader, self._segments)
        load_optimizer_state(self.optimizer, reader, self._segments)
        store_loaded_moments(self.optimizer)

    def gather_full_parameters(self) -> dict[str, torch.Tensor]:
        """One unit in memory at a time when the shards live on disk."""
        unit_of = {id(p): index for index, unit in enumerate(self._units) for p in unit.parameters()}
        by_unit: dict[int | None, list[tuple[str, torch.Tensor]]] = {}
        for name, p in self._named:
            by_unit.setdefault(unit_of.get(id(p)), []).append((name, p))
        full: dict[str, torch.Tensor] = {}
        for index, named in by_unit.items():
            with self._holding(None if index is None else self._units[index]):
                for name, p in named:
                    # Offloaded shards sit on the CPU, where an NCCL group cannot gather them.
                    full[name] = p.detach().to(self._comm.device).full_tensor()
        return {name: full[name] for name, _ in self._named}

    def _holding(self, unit: nn.Module | None) -> AbstractContextManager[None]:
        return nullcontext() if self._param_swap is None or unit is None else self._param_swap.holding(unit)

    def state_bytes(self) -> dict[str, int]:
        def nbytes(t: torch.Tensor) -> int:
            t = local(t)
            return t.numel() * t.element_size()

        grads = sum(nbytes(p.grad) for _, p in self._named if p.grad is not None)
        state = sum(nbytes(v) for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
        if self._param_swap is None:
            return {"params": sum(nbytes(p) for _, p in self._named), "gradients": grads, "optimizer": state}
        swapped = {id(p) for unit in self._units for p in unit.parameters()}
        in_memory = sum(nbytes(p) for _, p in self._named if id(p) not in swapped) + self._param_swap.resident_bytes()
        return {"params": in_memory, "params_on_disk": self._param_swap.total_bytes(), "gradients": grads,
                "optimizer": state}
