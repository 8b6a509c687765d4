"""Block-quantized collectives for ZeRO++: all-gather (qwZ) and reduce-scatter (qgZ).

Quantization is symmetric and per block: every ``block_size`` consecutive values share
one fp32 scale ``absmax / qmax`` and are sent as integers in ``[-qmax, qmax]`` (int8:
``qmax`` 127; int4: 7, two values packed per byte). Rounding to the nearest integer
bounds the error of every value by half its block's scale; in fp32 arithmetic the
division and the multiplication back each add at most one rounding of a value no larger
than ``qmax * scale``, so::

    |x - dequantize(quantize(x))| <= scale * (1/2 + 2 * qmax * 2**-24)

A block holding an inf or a NaN gets a non-finite scale and decodes to non-finite
values, so fp16 overflow detection still sees the overflow after a quantized reduction.

Each rank's payload and scales travel as one byte buffer, so a quantized collective is a
single collective on the wire (one latency, one entry in the communicator's log). The
last block of a buffer may be short: its padding is never sent, so a small shard costs
its own values plus one scale per started block, whatever the block size.

* :func:`quantized_all_gather` quantizes this rank's input, all-gathers the bytes and
  decodes every rank's part (this rank's included, so all ranks compute with the same
  weights) into the output. Error per value: the bound above for its block.
* :func:`quantized_reduce_scatter` quantizes the chunk destined to each peer, exchanges
  them with one all-to-all, and decodes and sums the chunks it received in fp32. This is
  ZeRO++'s one-hop qgZ: within one node the all-to-all is the whole exchange; across
  nodes ZeRO++ adds an intra-node reduction before the inter-node hop, which this
  module does not do. Error per value: the sum of the senders' block bounds (at most
  ``N`` times the largest), divided by ``N`` for an average.

Both go through a :class:`~ds.core.comm.Communicator` (watchdog, collective log) and,
with ``async_op=True``, return a handle whose ``wait`` finishes the transfer and then
decodes, so callers overlap them with compute exactly as they overlap plain collectives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup, ReduceOp

from ds.core.errors import DsError

if TYPE_CHECKING:
    from ds.core.comm import CollectiveHandle, Communicator

_SCALE_BYTES = 4


@dataclass(frozen=True)
class BlockQuantization:
    """Symmetric integer quantization with one fp32 scale per block of values."""

    bits: Literal[4, 8] = 8
    block_size: int = 256

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise DsError(f"block quantization supports 4 or 8 bits, not {self.bits}; choose one of them.")
        if self.block_size <= 0 or self.block_size % 2:
            # int4 packs pairs of values into bytes, which must not straddle blocks.
            raise DsError(f"block_size must be a positive even number, not {self.block_size}.")

    @property
    def qmax(self) -> int:
        """The largest quantized magnitude: 127 for int8, 7 for int4."""
        return 2 ** (self.bits - 1) - 1

    @property
    def error_bound_factor(self) -> float:
        """Worst error of one value in units of its block's scale (see module docstring)."""
        return 0.5 + 2 * self.qmax * 2.0**-24

    def padded(self, numel: int) -> int:
        """``numel`` rounded up to whole blocks."""
        return -(-numel // self.block_size) * self.block_size

    def payload_bytes(self, numel: int) -> int:
        """Bytes of ``numel`` quantized values (int4: two per byte)."""
        return -(-numel * self.bits // 8)

    def encoded_bytes(self, numel: int) -> int:
        """Bytes one rank sends for ``numel`` values: payload plus one scale per started block."""
        return self.payload_bytes(numel) + self.padded(numel) // self.block_size * _SCALE_BYTES


def quantize_blocks(values: torch.Tensor, spec: BlockQuantization) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a tensor whose numel is a multiple of ``spec.block_size``.

    Returns the payload (int8 for 8 bits; uint8 with two values per byte for 4 bits) and
    one fp32 scale per block.
    """
    if values.numel() % spec.block_size:
        raise DsError(
            f"quantize_blocks needs whole blocks: {values.numel()} values is not a multiple of "
            f"{spec.block_size}; pad the input first."
        )
    blocks = values.reshape(-1, spec.block_size).float()
    scales = blocks.abs().amax(dim=1, keepdim=True) / spec.qmax
    # An all-zero block has scale 0; dividing by the smallest normal keeps its values 0.
    quantized = torch.round(blocks / scales.clamp_min(torch.finfo(torch.float32).tiny)).clamp_(-spec.qmax, spec.qmax)
    if spec.bits == 8:
        payload = quantized.to(torch.int8).reshape(-1)
    else:
        nibbles = (quantized + 8).to(torch.uint8).reshape(-1, 2)
        payload = nibbles[:, 0] | (nibbles[:, 1] << 4)
    return payload, scales.reshape(-1)


def dequantize_blocks(payload: torch.Tensor, scales: torch.Tensor, spec: BlockQuantization) -> torch.Tensor:
    """The fp32 values a :func:`quantize_blocks` result stands for, flat."""
    if spec.bits == 8:
        quantized = payload.float()
    else:
        packed = payload.view(torch.uint8)
        quantized = torch.stack((packed & 15, packed >> 4), dim=-1).float() - 8
    return (quantized.reshape(-1, spec.block_size) * scales.reshape(-1, 1)).reshape(-1)


def _encode_rows(rows: torch.Tensor, spec: BlockQuantization) -> torch.Tensor:
    """Quantize each row into ``[payload bytes | scale bytes]``, the padding left out."""
    count, numel = rows.shape
    padded = F.pad(rows.detach(), (0, spec.padded(numel) - numel))
    payload, scales = quantize_blocks(padded, spec)
    sent = payload.view(torch.uint8).reshape(count, -1)[:, : spec.payload_bytes(numel)]
    return torch.cat((sent, scales.view(torch.uint8).reshape(count, -1)), dim=1)


def _decode_rows(encoded: torch.Tensor, numel: int, spec: BlockQuantization) -> torch.Tensor:
    """Inverse of :func:`_encode_rows`: fp32 rows of ``numel`` values."""
    count = encoded.shape[0]
    payload_bytes = spec.payload_bytes(numel)
    payload = F.pad(encoded[:, :payload_bytes], (0, spec.payload_bytes(spec.padded(numel)) - payload_bytes))
    scales = encoded[:, payload_bytes:].contiguous().view(torch.float32)
    if spec.bits == 8:
        payload = payload.view(torch.int8)
    return dequantize_blocks(payload, scales, spec).reshape(count, -1)[:, :numel]


class PendingDecode:
    """A quantized collective in flight; :meth:`wait` completes the transfer, then decodes."""

    def __init__(self, comm: Communicator, transfer: CollectiveHandle, decode: Callable[[], None]) -> None:
        self._comm = comm
        self._transfer = transfer
        self._decode: Callable[[], None] | None = decode

    def wait(self) -> None:
        if self._decode is not None:
            self._comm.wait(self._transfer)
            self._decode()
            self._decode = None

    def is_completed(self) -> bool:
        return self._decode is None


def _finish(
    comm: Communicator, transfer: CollectiveHandle | None, decode: Callable[[], None], async_op: bool
) -> PendingDecode | None:
    assert transfer is not None, "issued with async_op=True"
    pending = PendingDecode(comm, transfer, decode)
    if async_op:
        return pending
    pending.wait()
    return None


def quantized_all_gather(
    comm: Communicator,
    output: torch.Tensor,
    input: torch.Tensor,
    *,
    group: ProcessGroup | None = None,
    spec: BlockQuantization,
    async_op: bool = False,
) -> PendingDecode | None:
    """``all_gather_into_tensor`` with every rank's part block-quantized on the wire.

    Same contract as :meth:`Communicator.all_gather_into_tensor` (``output`` holds group
    size x ``input`` values, in group-rank order); values come back within the module's
    error bound of the exact gather, in ``output``'s dtype.
    """
    world = dist.get_world_size(group)
    numel = input.numel()
    if output.numel() != world * numel:
        raise DsError(f"all-gather output has {output.numel()} values; {world} ranks x {numel} expected.")
    encoded = _encode_rows(input.reshape(1, numel), spec)
    gathered = torch.empty(world, encoded.shape[1], dtype=torch.uint8, device=input.device)
    transfer = comm.all_gather_into_tensor(gathered.view(-1), encoded.view(-1), group=group, async_op=True)

    def decode() -> None:
        output.view(world, numel).copy_(_decode_rows(gathered, numel, spec))

    return _finish(comm, transfer, decode, async_op)


def quantized_reduce_scatter(
    comm: Communicator,
    output: torch.Tensor,
    input: torch.Tensor,
    op: ReduceOp.RedOpType = ReduceOp.SUM,
    *,
    group: ProcessGroup | None = None,
    spec: BlockQuantization,
    async_op: bool = False,
) -> PendingDecode | None:
    """``reduce_scatter_tensor`` as a block-quantized all-to-all and a local fp32 sum.

    Same contract as :meth:`Communicator.reduce_scatter_tensor`; ``op`` is ``SUM`` or
    ``AVG``. Chunk ``j`` of ``input`` is quantized once, by its sender, for rank ``j``.
    """
    world = dist.get_world_size(group)
    numel = output.numel()
    if input.numel() != world * numel:
        raise DsError(f"reduce-scatter input has {input.numel()} values; {world} ranks x {numel} expected.")
    average = _is_average(op)
    encoded = _encode_rows(input.reshape(world, numel), spec)
    received = torch.empty_like(encoded)
    transfer = comm.all_to_all_single(received, encoded, group=group, async_op=True)

    def decode() -> None:
        total = _decode_rows(received, numel, spec).sum(dim=0)
        output.view(-1).copy_(total.div_(world) if average else total)

    return _finish(comm, transfer, decode, async_op)


def _is_average(op: ReduceOp.RedOpType) -> bool:
    if op == ReduceOp.SUM:
        return False
    if op == ReduceOp.AVG:
        return True
    raise DsError(
        f"a quantized reduce-scatter sums or averages; it cannot apply {op}. Turn off zero_quantized_gradients."
    )

