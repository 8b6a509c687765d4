"""Plain data parallelism: replicated state, bucketed all-reduce overlapped with backward.

This is core's default partitioner (``"data_parallel"``). Gradients land in flat
buckets; when the last gradient of a bucket has been accumulated during the backward
that ends an accumulation window, that bucket's all-reduce starts asynchronously while
autograd keeps computing earlier layers. Accumulation micro-steps only accumulate.

When a parameter's dtype equals the reduction dtype, its ``.grad`` *is* a view into the
bucket (autograd accumulates in place, no copy). Otherwise (bf16 parameters reduced in
fp32) a hook adds each fresh gradient into the fp32 bucket and drops it, which also
makes accumulation over micro-steps happen in fp32.

Bucket memory exists only inside an accumulation window: a bucket is allocated when its
first gradient arrives and freed after the step, like torch's ``zero_grad(set_to_none=True)``.
The next forward, when activations peak, therefore runs next to parameters, masters and
optimizer state only. Where the optimizer needs gradients in another dtype than the
reduction's (bf16 reduction, fp32 masters) the converted copy is made after the
reduction and also dropped after the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ds.core.partition import PartitionContext, Partitioner, broadcast_module_from_first_rank, scale_gradients
from ds.core.state_names import (
    load_masters,
    load_optimizer_state,
    master_shards,
    named_trainable_parameters,
    optimizer_state_shards,
    whole_segments,
)

if TYPE_CHECKING:
    from ds.core.checkpoint import CheckpointReader, TensorShard

DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    numel: int
    dtype: torch.dtype
    device: torch.device
    owned_by_views: bool
    buffer: torch.Tensor | None = None
    views: list[torch.Tensor] = field(default_factory=list)
    ready: int = 0
    work: Any = None

    def allocate(self) -> None:
        self.buffer = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        self.views, offset = [], 0
        for p in self.params:
            self.views.append(self.buffer[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


class DataParallelPartitioner(Partitioner):
    """Every rank holds full weights, gradients and optimizer state (ZeRO stage 0)."""

    def __init__(self, context: PartitionContext, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self._comm = context.comm
        self._group = context.mesh.group("dp")
        self._dp_size = context.mesh.size("dp")
        config = context.config
        self._predivide = float(config.gradient_predivide_factor) if config.prescale_gradients else 1.0
        precision = context.precision
        self.module = context.module.to(device=context.device, dtype=precision.param_dtype)
        self._named = named_trainable_parameters(self.module)
        self._params = [p for _, p in self._named]
        broadcast_module_from_first_rank(self._comm, self._group, self.module)
        self._reduce_dtype = precision.reduce_dtype
        self._buckets = self._build_buckets(bucket_bytes, context.device)
        self._slot = {id(p): (b, i) for b in self._buckets for i, p in enumerate(b.params)}
        self._sync_enabled = True

        if precision.has_master_copy:
            self._masters = [p.detach().to(precision.master_dtype).clone() for p in self._params]
        else:
            self._masters = self._params
        self._master_grads: list[torch.Tensor] = []
        self._segments = whole_segments([name for name, _ in self._named], self._masters)
        groups = context.param_groups_for(dict(zip(map(id, self._params), self._masters, strict=True)))
        self.optimizer = context.make_optimizer(groups)
        self.gradient_norm_group = None
        for param in self._params:
            param.register_post_accumulate_grad_hook(self._on_grad_ready)

    # -- construction -------------------------------------------------------------

    def _build_buckets(self, bucket_bytes: int, device: torch.device) -> list[_Bucket]:
        # Reverse registration order approximates the order gradients become ready.
        element_size = torch.empty((), dtype=self._reduce_dtype).element_size()
        buckets: list[list[nn.Parameter]] = [[]]
        filled = 0
        for param in reversed(self._params):
            if buckets[-1] and filled + param.numel() * element_size > bucket_bytes:
                buckets.append([])
                filled = 0
            buckets[-1].append(param)
            filled += param.numel() * element_size
        return [
            _Bucket(
                params,
                numel=sum(p.numel() for p in params),
                dtype=self._reduce_dtype,
                device=device,
                owned_by_views=all(p.dtype == self._reduce_dtype for p in params),
            )
            for params in buckets
        ]

    # -- gradient synchronisation -------------------------------------------------

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        bucket, index = self._slot[id(param)]
        if bucket.buffer is None:
            bucket.allocate()
        view = bucket.views[index]
        grad = param.grad
        if grad is not None and grad.data_ptr() != view.data_ptr():
            # bf16 parameters reduced in fp32, or the user reset .grad behind our back.
            view.add_(grad)
            param.grad = view if bucket.owned_by_views else None
        if not self._sync_enabled:
            return
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        if bucket.buffer is None:  # no gradient reached it: reduce zeros with the others
            bucket.allocate()
        assert bucket.buffer is not None
        if self._predivide != 1.0:
            bucket.buffer.div_(self._predivide)
        bucket.work = self._comm.all_reduce(bucket.buffer, group=self._group, async_op=True)

    def set_gradient_sync(self, enabled: bool) -> None:
        self._sync_enabled = enabled

    def finish_gradient_sync(self) -> None:
        for bucket in self._buckets:
            if bucket.work is None:  # parameters unused in this window never fired
                self._launch(bucket)
        post_scale = self._predivide / self._dp_size
        for bucket in self._buckets:
            self._comm.wait(bucket.work)
            bucket.work = None
            if post_scale != 1.0:
                assert bucket.buffer is not None
                bucket.buffer.mul_(post_scale)
        self._master_grads = []
        for master, param in zip(self._masters, self._params, strict=True):
            bucket, index = self._slot[id(param)]
            view = bucket.views[index]
            grad = view if view.dtype == master.dtype else view.to(master.dtype)  # e.g. bf16 reduction, fp32 masters
            master.grad = grad
            self._master_grads.append(grad)

    def owned_gradients(self) -> list[torch.Tensor]:
        return self._master_grads

    # -- optimizer ------------------------------------------------------------------

    def step(self, grad_scale: float = 1.0) -> None:
        scale_gradients(self._master_grads, grad_scale)
        self.optimizer.step()
        if self._masters is not self._params:
            with torch.no_grad():
                torch._foreach_copy_(self._params, self._masters)

    def zero_grad(self) -> None:
        for bucket in self._buckets:
            if bucket.work is not None:  # a backward without step may have left reductions in flight
                self._comm.wait(bucket.work)
            bucket.buffer, bucket.views = None, []
            bucket.ready = 0
            bucket.work = None
        for master, param in zip(self._masters, self._params, strict=True):
            master.grad = None
            param.grad = None
        self._master_grads = []

    # -- checkpoints ----------------------------------------------------------------

    def checkpoint_shards(self) -> list[TensorShard]:
        if self._comm.rank != 0:  # replicated state: one writer is enough
            return []
        return master_shards(self._segments) + optimizer_state_shards(self.optimizer, self._segments)

    def load_checkpoint(self, reader: CheckpointReader) -> None:
        load_masters(reader, self._segments)
        if self._masters is not self._params:
            with torch.no_grad():
                torch._foreach_copy_(self._params, self._masters)
        load_optimizer_state(self.optimizer, reader, self._segments)

    def gather_full_parameters(self) -> dict[str, torch.Tensor]:
        return {name: master.detach().clone() for (name, _), master in zip(self._named, self._masters, strict=True)}

    def state_bytes(self) -> dict[str, int]:
        param_bytes = sum(p.numel() * p.element_size() for p in self._params)
        if self._masters is not self._params:
            param_bytes += sum(m.numel() * m.element_size() for m in self._masters)
        grad_bytes = sum(b.buffer.numel() * b.buffer.element_size() for b in self._buckets if b.buffer is not None)
        state_bytes = sum(
            t.numel() * t.element_size()
            for state in self.optimizer.state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor)
        )
        return {"params": param_bytes, "gradients": grad_bytes, "optimizer": state_bytes}


def data_parallel_factory(context: PartitionContext) -> Partitioner:
    """Registered as ``"data_parallel"`` by core's builtin plugin."""
    return DataParallelPartitioner(context)
