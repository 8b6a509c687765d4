"""ZeRO stages 1 and 2: sharded optimizer state (1) and sharded gradients (2).

Both keep full compute-dtype parameters on every rank, so forward and backward need no
parameter communication. Per bucket (:class:`~ds.zero.flat_group.FlatGroup`):

* stage 1 accumulates full gradients locally over an accumulation window and
  reduce-scatters each bucket once, at the window's last backward, as soon as the
  bucket's last gradient is ready (overlapping the rest of backward);
* stage 2 reduce-scatters every micro-step into this rank's gradient slice and frees
  the full bucket, so only ``1/N`` of the gradients stay resident.

After the optimizer updates this rank's fp32 master slice, one all-gather per bucket
refreshes everybody's compute-dtype parameters; with ``overlap_comm`` (the default) those
gathers run behind the rest of the update and the next forward, each block waiting only
for its own buckets (:mod:`ds.zero.refresh_waits`), and the reduce-scatters behind backward. ``overlap_comm:
false`` finishes every reduction in its gradient hook and every gather inside ``step``.
With ``offload_optimizer`` the master slices, reduced gradients and optimizer state live
on the CPU (:mod:`ds.zero.offload`). ZeRO++'s qgZ and qwZ replace the reduce-scatter and
that all-gather with quantized ones (:mod:`ds.zero.zeropp`).

Byte budget per rank (Ψ parameters, N data-parallel ranks, g bytes per reduced gradient
element: the compute dtype's 2 under bf16 by default, 4 with ``communication_data_type: fp32``), checked on CPU by
``packages/zero/tests/test_peak_memory.py``:

================================  ==============  ===========================================
what                              bytes           alive
================================  ==============  ===========================================
compute-dtype parameters          2Ψ              always (``FlatGroup.full``)
fp32 master slice                 4Ψ/N            always (``FlatGroup.master``)
Adam moments                      8Ψ/N            always, from the first step
gradient buckets, stage 1         ≤ gΨ            first gradient of a bucket .. zero_grad
gradient slice, stage 2           gΨ/N            first reduction of a bucket .. zero_grad
full buckets, stage 2             ≤ open + 2      while a bucket fills and its reduction runs
reduce-scatter scratch            ≤ 3 shards      stage 1; stage 2 after a window's first micro-step
fp32 gradient copy (g = 2 only)   4Ψ/N            finish_gradient_sync .. zero_grad; none
                                                  with FusedAdam (GPU: it reads the slice)
optimizer temporaries             0 .. 2 masters  fused Adam: none; torch's for-loop: 2 x largest
parameter refresh                 0               all-gather in place from the owned slice
================================  ==============  ===========================================

So between steps, when the next forward builds its activations, a rank holds
``2Ψ + 12Ψ/N`` and no gradient memory; the peak is that plus activations plus whatever
gradients backward has produced by then (at most the stage's gradient row), or at the
step ``2Ψ + 12Ψ/N`` + gradients + the fp32 copy. With g = 2 this is the ZeRO paper's
``4Ψ + 12Ψ/N`` (stage 1) and ``2Ψ + 14Ψ/N`` (stage 2) plus the fp32 copy torch
optimizers need for fp32 masters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ds.core.optimizer_classes import FusedAdam
from ds.core.partition import PartitionContext, Partitioner, broadcast_module_from_first_rank, scale_gradients
from ds.core.state_names import (
    load_masters,
    load_optimizer_state,
    master_shards,
    named_trainable_parameters,
    optimizer_state_shards,
)
from ds.zero.disk_adam import moments_in_memory, store_loaded_moments
from ds.zero.flat_group import FlatGroup, build_flat_groups
from ds.zero.gradient_buckets import GradientBucket
from ds.zero.offload import HostMasters, build_host_optimizer
from ds.zero.refresh_waits import register_refresh_waits
from ds.zero.zeropp import ZeroPlusPlus

if TYPE_CHECKING:
    from ds.core.checkpoint import CheckpointReader, TensorShard
    from ds.zero.config import ZeroConfig


MAX_REDUCTIONS_IN_FLIGHT = 2
# The fused step updates this share of the parameters, the buckets the next forward needs
# first, before the rest, so their all-gathers run behind the rest of the update.
EARLY_UPDATE_SHARE = 1 / 8


class ShardedOptimizerPartitioner(Partitioner):
    """ZeRO stage 1 (``shard_gradients=False``) or stage 2 (``True``)."""

    def __init__(self, context: PartitionContext, zero: ZeroConfig, *, shard_gradients: bool) -> None:
        self._comm = context.comm
        self._group = context.mesh.group("dp")
        self._world = context.mesh.size("dp")
        self._shard_gradients = shard_gradients
        precision = context.precision
        self._reduce_dtype = precision.reduce_dtype
        zeropp = ZeroPlusPlus.from_config(zero, self._world)
        self._reduce_scatter, self._all_gather = zeropp.flat_group_collectives(self._comm)
        self.module = context.module.to(device=context.device, dtype=precision.param_dtype)
        named = named_trainable_parameters(self.module)
        broadcast_module_from_first_rank(self._comm, self._group, self.module)
        rank = dist.get_rank(self._group)
        offload = zero.offload_optimizer
        self._host = HostMasters(offload) if offload.device != "none" else None
        owned_groups: dict[int, list[FlatGroup]] = {}
        self._groups: list[FlatGroup] = []
        for index, user_group in enumerate(context.param_groups or [{"params": [p for _, p in named]}]):
            members = {id(p) for p in user_group["params"]}
            groups = build_flat_groups(
                [(n, p) for n, p in named if id(p) in members],
                bucket_numel=int(zero.reduce_bucket_size),
                world=self._world,
                rank=rank,
                param_dtype=precision.param_dtype,
                device=context.device,
                make_master=None if self._host is None else self._host.make_master,
            )
            owned_groups[index] = groups
            self._groups.extend(groups)
        persistent_full = not shard_gradients
        self._buckets = [GradientBucket(g, self._reduce_dtype, persistent_full=persistent_full) for g in self._groups]
        self._bucket_of = {id(p): (b, i) for b in self._buckets for i, p in enumerate(b.group.params)}
        self._sync_enabled = True
        self._in_flight: list[GradientBucket] = []
        self._overlap = zero.overlap_comm
        self._max_in_flight = MAX_REDUCTIONS_IN_FLIGHT if zero.overlap_comm else 0
        if self._host is not None:
            self._host.attach(self._groups)
        user_groups = context.param_groups or [{"params": [p for _, p in named]}]
        master_groups = [{**g, "params": [fg.master for fg in owned_groups[i]]} for i, g in enumerate(user_groups)]
        self.optimizer = (
            context.make_optimizer(master_groups) if self._host is None
            else build_host_optimizer(context.make_optimizer, master_groups, offload, rank)
        )
        if self._host is not None:
            self._host.use_optimizer(self.optimizer, self._reduce_dtype)
        # FusedAdam on device masters takes each reduced slice as it is (bf16 under bf16: no
        # fp32 copy), applies the engine's scale as it reads it and writes the compute-dtype
        # weights in the same pass (no separate refresh copy).
        self._fused = self._host is None and isinstance(self.optimizer, FusedAdam)
        # The optimizer's parameter order as bucket indices, for the fused step's lists.
        bucket_of_master = {id(g.master): i for i, g in enumerate(self._groups)}
        self._step_order = [bucket_of_master[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        self._step_phases = _step_phases(self._groups, split=self._fused and zero.overlap_comm)
        self._forward_order = [index for phase in self._step_phases for index in phase]
        split_on_gpu = len(self._step_phases) > 1 and context.device.type == "cuda"
        self._gather_stream = torch.cuda.Stream(context.device) if split_on_gpu else None
        self._segments = [s for g in self._groups for s in g.segments]
        self.gradient_norm_group = self._group
        for _, param in named:
            param.register_post_accumulate_grad_hook(self._on_grad_ready)
        if self._overlap:
            register_refresh_waits(self.module, self._groups)

    # -- gradients --------------------------------------------------------------------

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        bucket, index = self._bucket_of[id(param)]
        if bucket.full_grad is None:
            bucket.allocate()
        bucket.accumulate(index, param.grad)
        param.grad = None
        if self._shard_gradients or self._sync_enabled:
            bucket.ready += 1
            if bucket.ready == len(bucket.group.params):
                self._launch(bucket)

    def _launch(self, bucket: GradientBucket) -> None:
        if bucket.full_grad is None:  # a bucket no gradient reached: reduce zeros with the others
            bucket.allocate()
        assert bucket.full_grad is not None
        bucket.zero_unwritten()
        # Stage 2's first reduction of a window writes straight into the (new) gradient
        # slice; later ones, and stage 1 (whose slice is part of the input), need a scratch.
        first_of_window = not bucket.persistent_full and bucket.shard_grad is None
        out = torch.empty(bucket.group.shard_numel, dtype=bucket.dtype, device=bucket.full_grad.device)
        if first_of_window:
            bucket.shard_grad = out
        work = self._reduce_scatter(out, bucket.full_grad, group=self._group, async_op=True)
        bucket.pending = (work, None if first_of_window else out)
        bucket.ready = 0
        bucket.launched = True
        # Bound the reduce-scatter buffers alive at once: finish the oldest before more pile up.
        self._in_flight.append(bucket)
        if len(self._in_flight) > self._max_in_flight:
            self._drain(self._in_flight.pop(0))

    def _drain(self, bucket: GradientBucket) -> None:
        if bucket.pending is None:
            return
        work, scratch = bucket.pending
        self._comm.wait(work)
        bucket.pending = None
        if bucket in self._in_flight:
            self._in_flight.remove(bucket)
        if scratch is not None:
            assert bucket.shard_grad is not None
            if bucket.persistent_full:
                bucket.shard_grad.copy_(scratch)  # one reduction per window: the slice becomes the sum
            else:
                bucket.shard_grad.add_(scratch)
        if not bucket.persistent_full:
            bucket.drop_full()

    def set_gradient_sync(self, enabled: bool) -> None:
        # Stage 2 reduces every micro-step; finish the previous micro-step's reductions
        # before this backward produces new gradients.
        for bucket in self._buckets:
            self._drain(bucket)
        self._sync_enabled = enabled

    def finish_gradient_sync(self) -> None:
        for bucket in self._buckets:
            # Buckets holding parameters unused in this window never completed in a hook.
            unreduced = not bucket.launched if bucket.persistent_full else bucket.pending is None and bucket.ready > 0
            if unreduced:
                self._launch(bucket)
        for index, bucket in enumerate(self._buckets):
            self._drain(bucket)
            grad = bucket.reduced_gradient().div_(self._world)
            if self._host is not None:
                self._host.receive_gradient(index, grad)
            elif not self._fused:  # the fused step reads the slice itself
                # torch optimizers want gradients in the master dtype: a bf16 reduction costs
                # an fp32 copy of the slice, alive until zero_grad.
                bucket.group.master.grad = grad if grad.dtype == bucket.group.master.dtype else grad.float()
        if self._host is not None:
            self._host.gradients_arrived()

    def owned_gradients(self) -> list[torch.Tensor]:
        if self._fused:
            return [b.shard_grad for b in self._buckets if b.shard_grad is not None]
        return [b.group.master.grad for b in self._buckets if b.group.master.grad is not None]

    # -- step -------------------------------------------------------------------------

    def step(self, grad_scale: float = 1.0) -> None:
        for group in self._groups:
            group.wait_for_refresh()  # two steps without a forward between them
        if self._fused:
            self._fused_step_and_refresh(grad_scale)
        else:
            scale_gradients(self.owned_gradients(), grad_scale)
            if self._host is None:
                self.optimizer.step()
                for group in self._groups:
                    group.refresh_owned_slice()
            else:
                self._host.step(self.optimizer)
            self._refresh_parameters(self._forward_order, wait=False)
        if not self._overlap:
            for group in self._groups:
                group.wait_for_refresh()

    def _fused_step_and_refresh(self, grad_scale: float) -> None:
        """Update and gather in the phases of :func:`_step_phases`.

        Both updates are launched before any gather, so the device runs them back to back
        without waiting for the host; the first phase's gathers are issued from a side
        stream that waits only for the first update, so they run behind the second.
        """
        early, *rest = self._step_phases
        self._fused_step(early, grad_scale)
        if not rest:
            self._refresh_parameters(early, wait=False)
            return
        side = self._gather_stream
        early_updated = torch.cuda.current_stream().record_event() if side is not None else None
        self._fused_step(rest[0], grad_scale)
        with _after_event(side, early_updated):
            self._refresh_parameters(early, wait=False)
        self._refresh_parameters(rest[0], wait=False)

    def _fused_step(self, phase: list[int], grad_scale: float) -> None:
        optimizer = self.optimizer
        assert isinstance(optimizer, FusedAdam)  # self._fused
        stepped = set(phase)
        optimizer.step(
            gradients=[self._buckets[i].shard_grad if i in stepped else None for i in self._step_order],
            low_precision_copies=[self._groups[i].owned_slice for i in self._step_order],
            grad_scale=grad_scale,
        )

    def _refresh_parameters(self, groups: list[int], *, wait: bool) -> None:
        """All-gather the full parameters of ``groups`` (indices, in order) from the owned slices, in place.

        Without ``wait`` the gathers stay in flight; readers of ``full`` wait per group.
        """
        for index in groups:
            group = self._groups[index]
            group.refresh_launched(self._all_gather(group.full, group.owned_slice, group=self._group, async_op=True))
        if wait:
            for index in groups:
                self._groups[index].wait_for_refresh()

    def zero_grad(self) -> None:
        for bucket in self._buckets:
            self._drain(bucket)  # a backward without step may have left reductions in flight
            bucket.release()
            bucket.group.master.grad = None

    # -- checkpoints and accounting ---------------------------------------------------------

    def checkpoint_shards(self) -> list[TensorShard]:
        with moments_in_memory(self.optimizer):
            return master_shards(self._segments) + optimizer_state_shards(self.optimizer, self._segments)

    def load_checkpoint(self, reader: CheckpointReader) -> None:
        load_masters(reader, self._segments)
        load_optimizer_state(self.optimizer, reader, self._segments)
        store_loaded_moments(self.optimizer)
        for group in self._groups:
            group.wait_for_refresh()
            group.refresh_owned_slice()
        self._refresh_parameters(self._forward_order, wait=True)

    def gather_full_parameters(self) -> dict[str, torch.Tensor]:
        result = {}
        for group in self._groups:
            full = torch.empty(group.padded_numel, dtype=group.master.dtype, device=group.full.device)
            owned = group.master.detach().to(group.full.device)
            self._comm.wait(self._comm.all_gather_into_tensor(full, owned, group=self._group, async_op=True))
            for name, view in zip(group.names, group.param_views(full), strict=True):
                result[name] = view.clone()
        return result

    def state_bytes(self) -> dict[str, int]:
        def nbytes(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        params = sum(nbytes(g.full) + nbytes(g.master) for g in self._groups)
        # Gradient storage in the reduce dtype; the fp32 copy a bf16 reduction makes for the step is not counted.
        grads = sum(nbytes(b.full_grad) + (0 if b.persistent_full else nbytes(b.shard_grad)) for b in self._buckets)
        state = sum(nbytes(v) for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
        return {"params": params, "gradients": grads, "optimizer": state}


@contextmanager
def _after_event(stream: torch.cuda.Stream | None, event: torch.cuda.Event | None) -> Iterator[None]:
    """Issue work on ``stream`` once ``event`` has happened; on the current stream without one (CPU)."""
    if stream is None or event is None:
        yield
        return
    stream.wait_event(event)
    with torch.cuda.stream(stream):
        yield


def _step_phases(groups: list[FlatGroup], *, split: bool) -> list[list[int]]:
    """Group indices in the order the step updates and gathers them, in one or two phases.

    Groups were cut in backward order, so the next forward needs them in reverse. Gathered
    after the whole update, the buckets of the embedding and first layer arrive only after
    it, and the forward waits for them (about 1.8 ms a step for a 1.3B model on two GPUs).
    Split, the fused step first updates the groups holding the first ``EARLY_UPDATE_SHARE``
    of the parameters in forward order, whose gathers then run behind the update of the rest.
    """
    forward_order = list(reversed(range(len(groups))))
    if not split or len(groups) < 2:
        return [forward_order]
    early_numel = EARLY_UPDATE_SHARE * sum(g.numel for g in groups)
    count, covered = 0, 0
    while covered < early_numel and count < len(groups) - 1:
        covered += groups[forward_order[count]].numel
        count += 1
    return [forward_order[:count], forward_order[count:]]
