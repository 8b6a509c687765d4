"""Block-wise int8/int4 quantize and dequantize on the kernels of csrc/quantize.cu."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from ._launch import dense, on_device, reference, stream, supported_float
from ._native import dtype_code
from .opdefs import BITS, GROUP_SIZES


def quantize_blockwise(ext: ModuleType, x: Tensor, group_size: int = 128, bits: int = 8,
                       symmetric: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    if group_size not in GROUP_SIZES or bits not in BITS or not supported_float(x):
        return reference("quantize_blockwise")(x, group_size, bits, symmetric)
    flat = dense(x).view(-1)
    numel = flat.numel()
    groups = -(-numel // group_size)
    code_dtype = torch.int8 if bits == 8 and symmetric else torch.uint8
    codes = torch.empty(numel if bits == 8 else -(-numel // 2), dtype=code_dtype, device=x.device)
    scales = torch.empty(groups, dtype=torch.float32, device=x.device)
    offsets = torch.empty(0 if symmetric else groups, dtype=torch.float32, device=x.device)
    with on_device(x):
        ext.quantize_blockwise(flat.data_ptr(), codes.data_ptr(), scales.data_ptr(), offsets.data_ptr(), numel,
                               group_size, bits, symmetric, dtype_code(x.dtype), stream())
    return codes, scales, offsets


def dequantize_blockwise(ext: ModuleType, codes: Tensor, scales: Tensor, offsets: Tensor, numel: int,
                         group_size: int, bits: int, symmetric: bool, dtype: torch.dtype) -> Tensor:
    groups = -(-numel // group_size)
    fits = (
        group_size in GROUP_SIZES and bits in BITS and dtype in (torch.float32, torch.float16, torch.bfloat16)
        and codes.is_cuda and codes.element_size() == 1 and codes.numel() == (numel if bits == 8 else -(-numel // 2))
        and scales.dtype == torch.float32 and scales.numel() == groups
        and (symmetric or (offsets.dtype == torch.float32 and offsets.numel() == groups))
    )
    if not fits:
        return reference("dequantize_blockwise")(codes, scales, offsets, numel, group_size, bits, symmetric, dtype)
    codes = dense(codes)
    scales = dense(scales)
    offsets = dense(offsets) if not symmetric else offsets
    out = torch.empty(numel, dtype=dtype, device=codes.device)
    with on_device(codes):
        offsets_ptr = 0 if symmetric else offsets.data_ptr()
        ext.dequantize_blockwise(codes.data_ptr(), scales.data_ptr(), offsets_ptr, out.data_ptr(), numel, group_size,
                                 bits, symmetric, dtype_code(dtype), stream())
    return out
