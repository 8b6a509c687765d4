"""The op ``ds::woq_matmul``: a matmul with a weight-only quantized (int8/int4) weight, for decoding.

    from ds.kernels.cuda.triton_kernels.opdefs import quantize_weight
    qweight, scales, offsets = quantize_weight(linear.weight, bits=4, group_size=128)
    y = torch.ops.ds.woq_matmul(x, qweight, scales, offsets, 4, 128)   # == x @ W.T

Weight layout: the weight ``W`` is row-major ``[N, K]`` (``nn.Linear``'s ``[out, in]``) and
is quantized with ``ds::quantize_blockwise`` exactly as it quantizes any tensor (see
:mod:`ds.kernels.cuda.opdefs`). With ``K`` a multiple of ``group_size`` no group straddles
two rows, so the flat outputs reshape without copying into

* ``qweight``: ``[N, K]`` int8 (symmetric) or uint8 (asymmetric) codes for 8 bits;
  ``[N, K / 2]`` uint8 for 4 bits, byte ``k // 2`` of row ``n`` holding element ``k`` of
  that row in its low nibble when ``k`` is even, high nibble when odd;
* ``scales``: ``[N, K / group_size]`` float32, one per group of ``group_size`` consecutive
  elements of a row;
* ``offsets``: the same shape as ``scales`` (each group's minimum) for asymmetric codes;
  ``None`` or an empty tensor (what ``quantize_blockwise`` returns) for symmetric ones.

``woq_matmul`` accepts those tensors flat, as ``quantize_blockwise`` returns them, or
reshaped as above. ``x`` is ``[..., K]``; the result is ``[..., N]`` in ``x``'s dtype,
computed as ``x @ dequantized(W).T`` in float32 (float64 for float64 ``x``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..opdefs import check_quant_spec, dequantize_blockwise


def woq_shape(x: Tensor, qweight: Tensor, scales: Tensor, bits: int, group_size: int) -> tuple[int, int]:
    """``(N, K)`` of the weight, after checking that the quantized tensors describe one."""
    check_quant_spec(group_size, bits)
    torch._check(x.dim() >= 1, lambda: "woq_matmul needs x of shape [..., K], got a scalar")
    k = x.shape[-1]
    torch._check(k % group_size == 0, lambda: f"woq_matmul needs K (x's last dimension, {k}) to be a multiple "
                 f"of group_size {group_size}, so no quantization group spans two weight rows; pad K or "
                 "quantize with a group size that divides it")
    groups_per_row = k // group_size
    torch._check(scales.numel() % groups_per_row == 0 and scales.numel() > 0,
                 lambda: f"woq_matmul got {scales.numel()} scales, not a multiple of K / group_size = "
                 f"{groups_per_row}: were the weights quantized with group_size {group_size} and K {k}?")
    n = scales.numel() // groups_per_row
    torch._check(qweight.numel() * 8 == n * k * bits,
                 lambda: f"woq_matmul got {qweight.numel()} code bytes, but a [{n}, {k}] weight at {bits} bits "
                 f"has {n * k * bits // 8}: pass the codes ds::quantize_blockwise made with bits={bits}")
    torch._check(qweight.element_size() == 1 and not qweight.is_floating_point(),
                 lambda: f"woq_matmul needs int8/uint8 codes, got {qweight.dtype}")
    return n, k


def is_symmetric(offsets: Tensor | None) -> bool:
    return offsets is None or offsets.numel() == 0


def woq_matmul(x: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor | None, bits: int,
               group_size: int) -> Tensor:
    """``x @ W.T`` for the weight ``W`` that ``qweight``, ``scales`` and ``offsets`` encode."""
    n, k = woq_shape(x, qweight, scales, bits, group_size)
    symmetric = is_symmetric(offsets)
    if not symmetric:
        assert offsets is not None
        torch._check(offsets.numel() == scales.numel(), lambda: f"woq_matmul got {offsets.numel()} offsets "
                     f"for {scales.numel()} scales; pass one per group, or None for symmetric codes")
    compute = torch.promote_types(x.dtype, torch.float32)
    flat_offsets = scales.new_empty(0) if symmetric else offsets.reshape(-1)  # type: ignore[union-attr]
    weight = dequantize_blockwise(qweight.reshape(-1), scales.reshape(-1), flat_offsets, n * k, group_size, bits,
                                  symmetric, compute).view(n, k)
    return (x.reshape(-1, k).to(compute) @ weight.t()).to(x.dtype).reshape(*x.shape[:-1], n)


def quantize_weight(weight: Tensor, bits: int = 4, group_size: int = 128,
                    symmetric: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(qweight, scales, offsets)`` of a ``[N, K]`` weight in the layout ``woq_matmul`` reads.

    It is ``ds::quantize_blockwise`` plus reshapes (no copies); ``offsets`` is None when
    symmetric.
    """
    torch._check(weight.dim() == 2, lambda: f"quantize_weight needs a [N, K] weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    torch._check(k % group_size == 0, lambda: f"quantize_weight needs K = {k} to be a multiple of group_size "
                 f"{group_size}; choose a group size that divides K")
    codes, scales, offsets = torch.ops.ds.quantize_blockwise(weight, group_size, bits, symmetric)
    groups = scales.view(n, k // group_size)
    return codes.view(n, -1), groups, None if symmetric else offsets.view(n, k // group_size)


def define_ops(define: Callable[..., None]) -> None:
    """Declare ``woq_matmul`` through core's ``define`` callable."""
    define("woq_matmul", woq_matmul)


WOQ_OPS: tuple[str, ...] = ("woq_matmul",)
