"""The contract between the engine and a data-parallel partitioner.

A partitioner owns everything that differs between plain data parallelism and the ZeRO
stages: where master weights live, how gradients are synchronised (all-reduce or
reduce-scatter, bucketed and overlapped with backward), which optimizer state a rank
holds, and how that state is written to and read from a universal checkpoint. The
engine stays the same for every stage: it scales the loss, decides accumulation
boundaries, computes the global gradient norm from the gradients each rank owns,
skips steps on overflow, clips, and calls :meth:`Partitioner.step`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from ds.core.checkpoint import CheckpointReader, TensorShard
    from ds.core.comm import Communicator
    from ds.core.config import DsConfig
    from ds.core.mesh import Mesh


@dataclass(frozen=True)
class PrecisionPolicy:
    """Dtypes of one run: compute (model params), master weights, gradient reduction."""

    param_dtype: torch.dtype = torch.float32
    master_dtype: torch.dtype = torch.float32
    reduce_dtype: torch.dtype = torch.float32

    @property
    def has_master_copy(self) -> bool:
        """Low-precision training keeps separate fp32 master weights for the optimizer."""
        return self.param_dtype != self.master_dtype


OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
"""Builds the user's optimizer over master parameters given as torch param groups."""


@dataclass
class PartitionContext:
    """What a partitioner factory receives. Built once per ``initialize``."""

    module: nn.Module
    config: DsConfig
    mesh: Mesh
    comm: Communicator
    precision: PrecisionPolicy
    make_optimizer: OptimizerFactory
    device: torch.device
    param_groups: list[dict[str, Any]] | None = None
    """The user's parameter groups over model parameters (per-group lr, weight decay),
    or None for one group of every trainable parameter."""

    def param_groups_for(self, masters_by_param: dict[int, torch.Tensor]) -> list[dict[str, Any]]:
        """The user's groups with each model parameter replaced by its master tensor.

        ``masters_by_param`` maps ``id(model_param)`` to the master the optimizer
        updates. Parameters a partitioner does not own on this rank are left out.
        """
        groups = self.param_groups or [{"params": [p for p in self.module.parameters() if p.requires_grad]}]
        result = []
        for group in groups:
            masters = [masters_by_param[id(p)] for p in group["params"] if id(p) in masters_by_param]
            result.append({**group, "params": masters})
        return result


def scale_gradients(grads: list[torch.Tensor], grad_scale: float) -> None:
    """Multiply gradients in place: :meth:`Partitioner.step`'s scale for optimizers that cannot take it."""
    if grad_scale != 1.0 and grads:
        torch._foreach_mul_(grads, grad_scale)


class Partitioner(ABC):
    """Owns master weights, gradient sync and the optimizer step for one data-parallel layout.

    Attributes every implementation sets:

    * ``module``: the model the engine calls forward on (parameters in compute dtype);
    * ``optimizer``: the optimizer over the master parameters this rank owns; the LR
      scheduler acts on its ``param_groups``;
    * ``gradient_norm_group``: the process group over which per-rank sums of squared
      owned gradients add up to the global norm, or ``None`` when every rank already
      holds all gradients.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    gradient_norm_group: ProcessGroup | None

    @abstractmethod
    def set_gradient_sync(self, enabled: bool) -> None:
        """Tell the gradient hooks whether the coming backward ends an accumulation window.

        When disabled, gradients only accumulate locally; no communication happens.
        """

    @abstractmethod
    def finish_gradient_sync(self) -> None:
        """Wait for outstanding reductions; afterwards :meth:`owned_gradients` is final.

        Owned gradients are averaged over the data-parallel group and in master dtype.
        """

    @abstractmethod
    def owned_gradients(self) -> list[torch.Tensor]:
        """The master-dtype gradients this rank owns (and will apply in :meth:`step`)."""

    @abstractmethod
    def step(self, grad_scale: float = 1.0) -> None:
        """Apply the optimizer to owned master weights and refresh the compute weights.

        Every owned gradient counts as multiplied by ``grad_scale`` (the engine's inverse
        loss scale times its clipping factor). A partitioner may fold that into a fused
        update rather than rewrite the gradients first (:func:`scale_gradients`).
        """

    @abstractmethod
    def zero_grad(self) -> None:
        """Drop all gradients (model and master) so the next window starts clean."""

    @abstractmethod
    def checkpoint_shards(self) -> list[TensorShard]:
        """This rank's slices of model weights and optimizer state, by global name.

        Names: ``model/<fqn>`` for fp32 master weights and
        ``optimizer/<fqn>/<state key>`` for per-parameter optimizer state. Together over
        all ranks the slices cover each tensor exactly once.
        """

    @abstractmethod
    def load_checkpoint(self, reader: CheckpointReader) -> None:
        """Read the slices this rank owns, whatever layout wrote them."""

    @abstractmethod
    def gather_full_parameters(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter whole, in master dtype, by name, on every rank.

        A collective: all ranks must call it. Used for exports and parity tests, never
        on the training path.
        """

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for ``params``, ``gradients`` and ``optimizer`` state."""
        raise NotImplementedError(f"{type(self).__name__} does not report its memory")


def broadcast_module_from_first_rank(comm: Communicator, group: ProcessGroup, module: nn.Module) -> None:
    """Give every rank of ``group`` the first rank's parameters and buffers.

    Ranks may have initialised differently (unseeded init); every partitioner starts
    from one copy. Meta tensors are skipped: they hold no values (``ds.zero.Init`` shards,
    equal on every rank by construction).
    """
    import torch.distributed as dist

    if dist.get_world_size(group) == 1:
        return
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if not tensor.is_meta:
                comm.broadcast(tensor.data, src=src, group=group)
