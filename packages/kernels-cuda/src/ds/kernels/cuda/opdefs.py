"""Ops this package adds to ds, each defined by its plain-torch reference.

The plugin declares them through ``ds_define_kernel_ops``; core turns each into a
``torch.ops.ds.<name>`` custom op whose fake implementation is the reference run on fake
tensors, so torch.compile traces them. The references compute in float32 and return
contiguous tensors in the input dtype, like the kernels.

* ``swiglu(x)``: x's last dimension is ``[gate | up]``; returns ``silu(gate) * up``.
* ``bias_gelu(x, bias, approximate)``: ``gelu(x + bias)``; approximate is "none" (erf) or "tanh".
* ``quantize_blockwise(x, group_size, bits, symmetric) -> (codes, scales, offsets)`` and
  ``dequantize_blockwise(codes, scales, offsets, numel, group_size, bits, symmetric, dtype)``:
  x flattened into groups of ``group_size`` (32/64/128/256; the last may be short), one
  float32 scale per group (and for asymmetric, one float32 offset, the group minimum).
  Symmetric: ``q = clamp(round(x / scale), -qmax, qmax)``, ``scale = absmax / qmax``,
  qmax = 127 or 7, int8 codes. Asymmetric: ``q = clamp(round((x - min) / scale), 0, qmax)``,
  ``scale = (max - min) / qmax``, qmax = 255 or 15, uint8 codes. 4-bit codes are packed two
  per byte, even elements in the low nibble (two's complement when symmetric). The division
  is a multiplication by the float32 reciprocal, as in the kernels, so both round alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

GROUP_SIZES = (32, 64, 128, 256)
BITS = (4, 8)


def swiglu(x: Tensor) -> Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` along the last dimension."""
    torch._check(x.dim() > 0 and x.shape[-1] % 2 == 0,
                 lambda: f"swiglu needs an even last dimension [gate | up], got shape {tuple(x.shape)}")
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def swiglu_backward(grad_output: Tensor, x: Tensor) -> Tensor:
    """Gradient of :func:`swiglu` for x, laid out like x: ``[d gate | d up]``."""
    gate, up = x.float().chunk(2, dim=-1)
    grad = grad_output.float()
    s = torch.sigmoid(gate)
    return torch.cat([grad * up * s * (1 + gate * (1 - s)), grad * gate * s], dim=-1).to(x.dtype)


def bias_gelu(x: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    """``gelu(x + bias)`` with bias broadcast over the last dimension."""
    torch._check(bias.shape == x.shape[-1:], lambda: f"bias must have shape {tuple(x.shape[-1:])}, "
                 f"got {tuple(bias.shape)}")
    return F.gelu(x.float() + bias.float(), approximate=approximate).to(x.dtype)


def bias_gelu_backward(
    grad_output: Tensor, x: Tensor, bias: Tensor, approximate: str = "none"
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`bias_gelu` for x and bias."""
    pre = x.float() + bias.float()
    grad_x = torch.ops.aten.gelu_backward(grad_output.float(), pre, approximate=approximate)
    return grad_x.to(x.dtype), grad_x.reshape(-1, x.shape[-1]).sum(0).to(bias.dtype)


def check_quant_spec(group_size: int, bits: int) -> None:
    torch._check(group_size in GROUP_SIZES, lambda: f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    torch._check(bits in BITS, lambda: f"bits must be 4 or 8, got {bits}")


def quantize_blockwise(x: Tensor, group_size: int = 128, bits: int = 8,
                       symmetric: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Codes, per-group scales and (asymmetric only, else empty) per-group offsets of x."""
    check_quant_spec(group_size, bits)
    flat = x.reshape(-1).float()
    numel = flat.numel()
    groups = -(-numel // group_size)
    pad = groups * group_size - numel
    if pad:  # repeat the last element: it changes no group's min, max or absmax
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    grouped = flat.view(groups, group_size)
    if symmetric:
        qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1) - 1)
        scales = grouped.abs().amax(dim=1) / qmax
        offsets = grouped.new_empty(0)
        shifted = grouped
    else:
        qmax, qmin = 2**bits - 1, 0
        low = grouped.amin(dim=1)
        scales = (grouped.amax(dim=1) - low) / qmax
        offsets = low
        shifted = grouped - low[:, None]
    inverse = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    codes = torch.round(shifted * inverse[:, None]).clamp(qmin, qmax).to(torch.int32).reshape(-1)[:numel]
    if bits == 8:
        return codes.to(torch.int8 if symmetric else torch.uint8), scales, offsets
    nibbles = codes & 0xF
    if numel % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8), scales, offsets


def dequantize_blockwise(codes: Tensor, scales: Tensor, offsets: Tensor, numel: int, group_size: int, bits: int,
                         symmetric: bool, dtype: torch.dtype) -> Tensor:
    """The 1-D tensor of ``numel`` values that :func:`quantize_blockwise` codes stand for."""
    check_quant_spec(group_size, bits)
    if bits == 8:
        values = codes.reshape(-1)[:numel].to(torch.int32)
    else:
        packed = codes.reshape(-1).to(torch.int32)
        values = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:numel]
        if symmetric:
            values = (values ^ 8) - 8
    group = torch.arange(numel, device=codes.device) // group_size
    out = values.float() * scales[group]
    if not symmetric:
        out = out + offsets[group]
    return out.to(dtype)


def define_ops(define: Callable[..., None]) -> None:
    """Declare every op of this module through core's ``define`` callable."""
    define("swiglu", swiglu, backward=swiglu_backward)
    define("bias_gelu", bias_gelu, backward=bias_gelu_backward)
    define("quantize_blockwise", quantize_blockwise)
    define("dequantize_blockwise", dequantize_blockwise)


EXTRA_OPS: tuple[str, ...] = (
    "swiglu", "swiglu_backward", "bias_gelu", "bias_gelu_backward", "quantize_blockwise", "dequantize_blockwise",
)
