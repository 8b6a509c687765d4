"""ZeRO-Offload for stages 1 and 2: fp32 master slices, gradients and optimizer on the CPU.

With ``offload_optimizer: {device: cpu}`` (or ``nvme``) a rank keeps only the
compute-dtype parameters and the gradient buckets on its accelerator. Per optimizer step:

1. the fp32 master slices are built in host memory (page-locked at their exact size when
   ``pin_memory`` is set and CUDA is available, :mod:`ds.zero.host_memory`);
2. each flat group's reduced gradient slice is copied into a host buffer (non-blocking;
   one stream sync before the engine reads the gradient norm);
3. the optimizer updates the CPU master slices. An Adam, AdamW or Adagrad optimizer (from
   the config or passed to ``initialize``) runs as :class:`~ds.zero.cpu_adam.CPUAdam` or
   :class:`~ds.zero.cpu_adam.CPUAdagrad`, as DeepSpeed turns Adam into DeepSpeedCPUAdam,
   writing the bf16/fp16 copy of each slice into a staging buffer in the same pass; that
   copy goes into the device parameters while the next slice is updated. Any other
   optimizer runs as itself on the CPU tensors;
4. the device parameters are all-gathered in place as without offload.

With ``nvme`` the Adam moments live in files under ``nvme_path`` between steps
(:class:`~ds.zero.disk_adam.DiskStateAdam`). Checkpoints are unchanged: the segments
point at the CPU masters, so a checkpoint saved with offload loads without it.

Stage 3 uses :func:`build_host_optimizer` alone: there the masters are FSDP2's CPU
DTensor shards, which the CPU optimizers update through their local tensors.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any

import torch

from ds.core.errors import ConfigError
from ds.core.optimizer_classes import FusedAdam
from ds.core.optimizers import AdamWithoutBiasCorrection
from ds.zero.cpu_adam import CPUAdagrad, CPUAdam
from ds.zero.host_memory import host_empty, pin_host_memory

if TYPE_CHECKING:
    from ds.core.partition import OptimizerFactory
    from ds.zero.config import OffloadConfig
    from ds.zero.flat_group import FlatGroup


def _adam_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]] | None:
    """The optimizer's groups in CPUAdam's terms, or None when it is no plain Adam/AdamW.

    ds's own FusedAdam counts too: a factory or an optimizer passed to ``initialize`` may
    be one, and on host masters it would fall back to its unfused torch reference.
    """
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW, FusedAdam):
        bias_correction = True  # FusedAdam's groups carry their own
    elif isinstance(optimizer, AdamWithoutBiasCorrection):
        bias_correction = False
    else:
        return None
    if any(g.get("amsgrad") or g.get("maximize") for g in optimizer.param_groups):
        return None
    default_decoupled = isinstance(optimizer, torch.optim.AdamW)
    return [
        {
            "params": g["params"],
            "lr": float(g["lr"]),
            "betas": tuple(float(b) for b in g["betas"]),
            "eps": float(g["eps"]),
            "weight_decay": float(g["weight_decay"]),
            "decoupled_weight_decay": bool(g.get("decoupled_weight_decay", default_decoupled)),
            "bias_correction": bool(g.get("bias_correction", bias_correction)),
        }
        for g in optimizer.param_groups
    ]


def _adagrad_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]] | None:
    """The optimizer's groups in CPUAdagrad's terms, or None when it is no plain Adagrad."""
    if type(optimizer) is not torch.optim.Adagrad or any(g.get("maximize") for g in optimizer.param_groups):
        return None
    keys = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")
    return [{"params": g["params"], **{k: float(g[k]) for k in keys}} for g in optimizer.param_groups]


def build_host_optimizer(
    make_optimizer: OptimizerFactory, groups: list[dict[str, Any]], offload: OffloadConfig, rank: int
) -> torch.optim.Optimizer:
    """The user's optimizer over CPU masters; Adam/AdamW/Adagrad become CPU Adam/Adagrad
    (Adam's moments on disk for nvme).

    The user's optimizer is built first and translated, so an Adam given as a config
    section, a torch optimizer or a factory all become CPU Adam alike.
    """
    built = make_optimizer(groups)
    adam_groups = _adam_groups(built)
    if offload.device == "nvme":
        if adam_groups is None and not isinstance(built, CPUAdam):
            raise ConfigError(
                f"zero_optimization.offload_optimizer.device nvme keeps Adam's moments on disk, but the "
                f"optimizer is {type(built).__name__}; use an Adam/AdamW/CPUAdam optimizer or offload to cpu."
            )
        from ds.zero.disk_adam import DiskStateAdam

        assert offload.nvme_path is not None  # the config requires it
        os.makedirs(offload.nvme_path, exist_ok=True)
        folder = tempfile.mkdtemp(prefix=f"ds_zero_optimizer_rank{rank}_", dir=offload.nvme_path)
        return DiskStateAdam(adam_groups or built.param_groups, folder=folder, offload=offload)
    if adam_groups is not None:
        return CPUAdam(adam_groups)
    adagrad_groups = _adagrad_groups(built)
    return built if adagrad_groups is None else CPUAdagrad(adagrad_groups)


class HostMasters:
    """Moves stage 1/2 flat groups' masters to the CPU and runs the step there.

    Host memory per parameter: the fp32 master (4 bytes), its gradient (4, or 2 when a bf16
    reduction meets ds's CPU optimizers) and the optimizer's state. The compute-dtype copy
    that goes back to the device is written by CPU Adam into one of two staging buffers the
    size of the largest group, and copied straight into the device parameters while the
    next group is updated, so it costs neither host memory per parameter nor step time.
    """

    STAGING_BUFFERS = 2

    def __init__(self, offload: OffloadConfig) -> None:
        self.pin = pin_host_memory(offload)
        self.groups: list[FlatGroup] = []
        self._grads: list[torch.Tensor | None] = []
        self.gradient_dtype = torch.float32
        self._staging: list[torch.Tensor] = []
        self._copies_done: list[torch.cuda.Event | None] = [None] * self.STAGING_BUFFERS

    def make_master(self, owned: torch.Tensor) -> torch.Tensor:
        """A flat group's fp32 master slice, built straight in host memory (on the device
        first, a 13B model's masters alone would take 52 GB there before moving)."""
        return host_empty(owned.numel(), torch.float32, pin=self.pin).copy_(owned)

    def attach(self, groups: list[FlatGroup]) -> None:
        """The flat groups (built with :meth:`make_master`) whose steps run here."""
        self.groups = groups
        self._grads = [None] * len(groups)

    def use_optimizer(self, optimizer: torch.optim.Optimizer, reduce_dtype: torch.dtype) -> None:
        """Keep bf16-reduced gradients in bf16 on the host when ds's CPU optimizers read them.

        They take bf16 gradients directly, which saves 2 bytes a parameter of host memory
        (13 GB at 6.7B). torch's optimizers want gradients in the master's dtype, and fp16
        gradients stay fp32: unscaling fp16 in place would flush small gradients to zero.
        A gradient of another dtype than its tensor needs torch's ``grad_dtype`` (2.10+).
        """
        bf16_ok = reduce_dtype == torch.bfloat16 and hasattr(self.groups[0].master, "grad_dtype")
        if bf16_ok and isinstance(optimizer, (CPUAdam, CPUAdagrad)):
            self.gradient_dtype = torch.bfloat16
            for group in self.groups:
                group.master.grad_dtype = None

    def receive_gradient(self, index: int, shard_grad: torch.Tensor) -> None:
        """Start copying one group's reduced (already averaged) gradient slice to the CPU."""
        host = self._grads[index]
        if host is None:
            host = self._grads[index] = host_empty(self.groups[index].shard_numel, self.gradient_dtype, pin=self.pin)
        host.copy_(shard_grad, non_blocking=self.pin and shard_grad.is_cuda)
        self.groups[index].master.grad = host

    def gradients_arrived(self) -> None:
        """Wait for the non-blocking copies: the engine reads the gradients next."""
        if self.pin and any(g.full.is_cuda for g in self.groups):
            torch.cuda.current_stream().synchronize()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Update the masters and write each group's new values into its device slice."""
        low_dtype = self.groups[0].full.dtype
        if not isinstance(optimizer, (CPUAdam, CPUAdagrad)) or low_dtype == torch.float32:
            optimizer.step()
            for group in self.groups:
                group.owned_slice.copy_(group.master, non_blocking=self.pin)
            return
        if not self._staging:
            largest = max(g.shard_numel for g in self.groups)
            self._staging = [host_empty(largest, low_dtype, pin=self.pin) for _ in range(self.STAGING_BUFFERS)]
        by_master = {id(g.master): g for g in self.groups}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # Updated parameters take the staging buffers in turn (one without a gradient is skipped).
        buffer_of: dict[int, int] = {}
        for slot, param in enumerate(params):
            if param.grad is not None:
                buffer_of[slot] = len(buffer_of) % self.STAGING_BUFFERS
        staged = [self._staging[buffer_of[slot]][: p.numel()] if slot in buffer_of else None
                  for slot, p in enumerate(params)]

        def copy_out(slot: int) -> None:
            group, buffer = by_master[id(params[slot])], buffer_of[slot]
            group.owned_slice.copy_(staged[slot], non_blocking=self.pin)
            if group.full.is_cuda and self.pin:
                done = self._copies_done[buffer] = torch.cuda.Event()
                done.record()
            # The next update writes into the other buffer: its copy must have finished.
            previous = self._copies_done[(buffer + 1) % self.STAGING_BUFFERS]
            if previous is not None:
                previous.synchronize()

        optimizer.step(low_precision_params=staged, after_update=copy_out)
