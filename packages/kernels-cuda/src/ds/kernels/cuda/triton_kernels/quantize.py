"""Block-wise int8/int4 quantize and dequantize as Triton kernels, in the layout of ``ds::quantize_blockwise``.

The layout (groups of ``group_size`` consecutive elements of the flattened input, float32
scales, float32 group minimums as offsets when asymmetric, int4 codes two to a byte with
the even element in the low nibble) is defined in :mod:`ds.kernels.cuda.opdefs`; each
program here handles a tile of whole groups, so a group's statistics never leave registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..opdefs import BITS, GROUP_SIZES
from ._common import ROUND_MAGIC, floats, interpreting, reference

_TILE = 4096
"""Elements a program aims to handle: ``_TILE // group_size`` groups."""


@triton.jit
def _quantize(x_ptr, codes_ptr, scales_ptr, offsets_ptr, numel, groups, GROUP: tl.constexpr,
              GROUPS: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr, QMAX: tl.constexpr,
              MAGIC: tl.constexpr):
    group = (tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)).to(tl.int64)
    element = group[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = element < numel
    x = tl.load(x_ptr + element, mask=mask, other=0.0).to(tl.float32)
    if SYMMETRIC:
        scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), QMAX * 1.0)
        shifted = x
        q_low = -QMAX
    else:
        low = tl.min(tl.where(mask, x, float("inf")), axis=1)
        high = tl.max(tl.where(mask, x, float("-inf")), axis=1)
        scale = tl.math.div_rn(high - low, QMAX * 1.0)
        shifted = x - low[:, None]
        q_low = 0
        tl.store(offsets_ptr + group, low, mask=group < groups)
    tl.store(scales_ptr + group, scale, mask=group < groups)
    inverse = tl.where(scale > 0, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale), 0.0)
    scaled = shifted * inverse[:, None]
    q = tl.minimum(tl.maximum((scaled + MAGIC) - MAGIC, q_low), QMAX).to(tl.int32)
    if BITS == 8:
        tl.store(codes_ptr + element, q.to(codes_ptr.dtype.element_ty), mask=mask)
    else:
        q = tl.where(mask, q, 0)  # the pad nibble of an odd-length input is zero
        even, odd = tl.split(tl.reshape(q, [GROUPS, GROUP // 2, 2]))
        pair = group[:, None] * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, :]
        tl.store(codes_ptr + pair, ((even & 0xF) | ((odd & 0xF) << 4)).to(tl.uint8), mask=pair * 2 < numel)


@triton.jit
def _dequantize(codes_ptr, scales_ptr, offsets_ptr, out_ptr, numel, groups, GROUP: tl.constexpr,
                GROUPS: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr):
    group = (tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)).to(tl.int64)
    element = group[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = element < numel
    if BITS == 8:
        values = tl.load(codes_ptr + element, mask=mask, other=0).to(tl.float32)
    else:
        pair = group[:, None] * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, :]
        packed = tl.load(codes_ptr + pair, mask=pair * 2 < numel, other=0).to(tl.int32)
        even, odd = packed & 0xF, (packed >> 4) & 0xF
        if SYMMETRIC:  # two's complement nibbles
            even, odd = (even ^ 8) - 8, (odd ^ 8) - 8
        values = tl.reshape(tl.join(even, odd), [GROUPS, GROUP]).to(tl.float32)
    out = values * tl.load(scales_ptr + group, mask=group < groups, other=0.0)[:, None]
    if not SYMMETRIC:
        out += tl.load(offsets_ptr + group, mask=group < groups, other=0.0)[:, None]
    tl.store(out_ptr + element, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_shape(groups: int, group_size: int) -> tuple[int, int]:
    """Groups per program and the program count."""
    per_program = max(1, min(_TILE // group_size, triton.next_power_of_2(groups)))
    return per_program, triton.cdiv(groups, per_program)


def quantize_blockwise(x: Tensor, group_size: int = 128, bits: int = 8,
                       symmetric: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    if group_size not in GROUP_SIZES or bits not in BITS or x.numel() == 0 or not floats(x):
        return reference("quantize_blockwise")(x, group_size, bits, symmetric)
    flat = x.reshape(-1)
    numel = flat.numel()
    groups = triton.cdiv(numel, group_size)
    code_dtype = torch.int8 if bits == 8 and symmetric else torch.uint8
    codes = torch.empty(numel if bits == 8 else triton.cdiv(numel, 2), dtype=code_dtype, device=x.device)
    scales = torch.empty(groups, dtype=torch.float32, device=x.device)
    offsets = torch.empty(0 if symmetric else groups, dtype=torch.float32, device=x.device)
    per_program, programs = _launch_shape(groups, group_size)
    qmax = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    _quantize[(programs,)](flat, codes, scales, offsets if not symmetric else scales, numel, groups,
                           GROUP=group_size, GROUPS=per_program, BITS=bits, SYMMETRIC=symmetric, QMAX=qmax,
                           MAGIC=ROUND_MAGIC, num_warps=8)
    return codes, scales, offsets


def dequantize_blockwise(codes: Tensor, scales: Tensor, offsets: Tensor, numel: int, group_size: int, bits: int,
                         symmetric: bool, dtype: torch.dtype) -> Tensor:
    groups = triton.cdiv(numel, group_size) if numel > 0 else 0
    on_device = codes.is_cuda or (interpreting() and codes.device.type == "cpu")
    fits = (
        numel > 0 and group_size in GROUP_SIZES and bits in BITS and dtype in (torch.float32, torch.float16,
                                                                                torch.bfloat16)
        and on_device and codes.element_size() == 1 and codes.numel() == (numel if bits == 8 else -(-numel // 2))
        and scales.dtype == torch.float32 and scales.numel() == groups and scales.device == codes.device
        and (symmetric or (offsets.dtype == torch.float32 and offsets.numel() == groups
                           and offsets.device == codes.device))
    )
    if not fits:
        return reference("dequantize_blockwise")(codes, scales, offsets, numel, group_size, bits, symmetric, dtype)
    out = torch.empty(numel, dtype=dtype, device=codes.device)
    per_program, programs = _launch_shape(groups, group_size)
    scales = scales.reshape(-1)
    _dequantize[(programs,)](codes.reshape(-1), scales, scales if symmetric else offsets.reshape(-1), out, numel,
                             groups, GROUP=group_size, GROUPS=per_program, BITS=bits, SYMMETRIC=symmetric,
                             num_warps=8)
    return out
