"""ZeRO++ in ds's stages: quantized weights (qwZ), secondary partition (hpZ), quantized
gradients (qgZ), chosen once per partitioner from the ``zero_optimization`` section.

* **qwZ** (``zero_quantized_weights``): parameters travel as block int8 whenever they are
  gathered for compute. Stages 1 and 2: the all-gather that refreshes every rank's
  compute weights after the optimizer step. Stage 3: FSDP2's per-module all-gathers over
  the whole data-parallel group (forward, and backward unless hpZ applies). The fp32
  master weights and optimizer state stay exact; compute weights are within half a
  block scale of them, and identical on every rank.
* **hpZ** (``zero_hpz_partition_size``, stage 3): after forward each module keeps its
  parameters sharded over groups of that many consecutive ranks (one node, with
  torchrun's rank order) instead of over everybody, so backward gathers them within the
  group, over the fast intra-node links, at the cost of ``dp / hpz`` times the sharded
  parameter memory between forward and backward. That gather moves the already
  quantized forward values unquantized, so qwZ's error is not applied twice. A size of
  1 or the data-parallel size leaves the ordinary resharding. FSDP2 builds the secondary
  groups anew for every module (pytorch/pytorch#153302): two process groups per shard
  unit, each with its own NCCL communicator memory on GPUs.
* **qgZ** (``zero_quantized_gradients``): gradient reduce-scatters become one block-int8
  all-to-all plus a local fp32 sum (stages 1 and 2: each bucket's reduce-scatter;
  stage 3: FSDP2's per-module reduce-scatter). One hop: ZeRO++'s extra intra-node
  reduction before the inter-node exchange is not done.

Block size and bit widths are fixed (:data:`WEIGHT_QUANTIZATION`,
:data:`GRADIENT_QUANTIZATION`) because DeepSpeed's config has no keys for them; error
bounds are in :mod:`ds.zero.quantized_collectives`. With one data-parallel rank nothing
is communicated and nothing is quantized.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup, ReduceOp

from ds.core.errors import ConfigError
from ds.zero.quantized_collectives import BlockQuantization, quantized_all_gather, quantized_reduce_scatter

if TYPE_CHECKING:
    from ds.core.comm import Communicator
    from ds.zero.config import ZeroConfig

WEIGHT_QUANTIZATION = BlockQuantization(bits=8, block_size=256)
"""qwZ: int8 (as ZeRO++) in blocks of 256, so scales add 1/64 byte per value."""

GRADIENT_QUANTIZATION = BlockQuantization(bits=8, block_size=256)
"""qgZ: int8 in blocks of 256."""

Collective = Callable[..., Any]
"""A communicator method's signature: ``(output, input, ..., group=, async_op=)``."""


class FlatGroupCollectives(NamedTuple):
    """What stages 1 and 2 call for their per-bucket collectives."""

    reduce_scatter: Collective
    all_gather: Collective


@dataclass(frozen=True)
class ZeroPlusPlus:
    """Which ZeRO++ features one partitioner uses, checked against its data-parallel size."""

    quantize_weights: bool
    quantize_gradients: bool
    hpz_partition_size: int
    dp_size: int

    @classmethod
    def from_config(cls, zero: ZeroConfig, dp_size: int) -> ZeroPlusPlus:
        hpz = int(zero.zero_hpz_partition_size)
        if hpz > 1 and (hpz > dp_size or dp_size % hpz):
            raise ConfigError(
                f"zero_optimization.zero_hpz_partition_size={hpz} must divide the data-parallel size "
                f"{dp_size}; set it to the number of ranks per node (a divisor of {dp_size}) or 1."
            )
        communicates = dp_size > 1
        return cls(
            quantize_weights=communicates and zero.zero_quantized_weights,
            quantize_gradients=communicates and zero.zero_quantized_gradients,
            hpz_partition_size=hpz if 1 < hpz < dp_size else 1,
            dp_size=dp_size,
        )

    # -- stages 1 and 2 ------------------------------------------------------------------

    def flat_group_collectives(self, comm: Communicator) -> FlatGroupCollectives:
        """The reduce-scatter and all-gather for flat buckets, quantized as configured."""
        return FlatGroupCollectives(
            reduce_scatter=(
                partial(quantized_reduce_scatter, comm, spec=GRADIENT_QUANTIZATION)
                if self.quantize_gradients
                else comm.reduce_scatter_tensor
            ),
            all_gather=(
                partial(quantized_all_gather, comm, spec=WEIGHT_QUANTIZATION)
                if self.quantize_weights
                else comm.all_gather_into_tensor
            ),
        )

    # -- stage 3 -------------------------------------------------------------------------

    def reshard_after_forward(self, reshard: bool) -> bool | int:
        """FSDP2's ``reshard_after_forward`` for a module: hpZ's group size where it reshards."""
        return self.hpz_partition_size if reshard and self.hpz_partition_size > 1 else reshard

    def install_fsdp_collectives(self, modules: Sequence[nn.Module], comm: Communicator) -> None:
        """Route the all-gathers and reduce-scatters of FSDP2 ``modules`` through ds."""
        if not (self.quantize_weights or self.quantize_gradients):
            return
        for module in modules:
            if not hasattr(module, "set_custom_all_gather"):
                raise ConfigError(
                    f"ZeRO++ quantized collectives at stage 3 need torch >= 2.8 (FSDP2 custom "
                    f"collectives); this is torch {torch.__version__}. Upgrade torch, or turn off "
                    "zero_quantized_weights and zero_quantized_gradients."
                )
            if self.quantize_weights:
                module.set_custom_all_gather(_FSDPQuantizedAllGather(comm, self.dp_size))  # type: ignore[operator]
            if self.quantize_gradients:
                module.set_custom_reduce_scatter(_FSDPQuantizedReduceScatter(comm))  # type: ignore[operator]


class _FSDPBuffers:
    """Plain allocation, as FSDP2's default collectives do."""

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


class _FSDPQuantizedAllGather(_FSDPBuffers):
    """FSDP2's ``AllGather`` interface: qwZ over the whole data-parallel group.

    hpZ's backward gather (a smaller group) and non-float buffers go through unquantized.
    The collective completes before returning (``None`` tells FSDP2 there is no work to
    wait on); on accelerators that only orders FSDP2's all-gather stream after it.
    """

    def __init__(self, comm: Communicator, primary_size: int) -> None:
        self._comm = comm
        self._primary_size = primary_size

    def __call__(
        self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: ProcessGroup, async_op: bool = False
    ) -> None:
        if output_tensor.is_floating_point() and dist.get_world_size(group) == self._primary_size:
            quantized_all_gather(self._comm, output_tensor, input_tensor, group=group, spec=WEIGHT_QUANTIZATION)
        else:
            self._comm.all_gather_into_tensor(output_tensor, input_tensor, group=group)


class _FSDPQuantizedReduceScatter(_FSDPBuffers):
    """FSDP2's ``ReduceScatter`` interface: qgZ (FSDP2 asks for ``SUM`` or ``AVG``)."""

    def __init__(self, comm: Communicator) -> None:
        self._comm = comm

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: ProcessGroup,
        op: ReduceOp.RedOpType = ReduceOp.SUM,
        async_op: bool = False,
    ) -> None:
        quantized_reduce_scatter(self._comm, output_tensor, input_tensor, op, group=group, spec=GRADIENT_QUANTIZATION)
