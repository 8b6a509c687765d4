"""fp8 block quantize and dequantize on the kernels of csrc/quantize_fp8.cu.

The kernels need hardware fp8 conversion (compute capability 8.9: Ada, Hopper and newer)
and exist only in the CUDA build; :func:`fp8_problem` tells the backend why they cannot run
elsewhere, without loading the extension.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from ._launch import dense, on_device, reference, stream, supported_float
from ._native import NativeLibrary, dtype_code
from .opdefs import GROUP_SIZES

FORMAT_CODES: dict[torch.dtype, int] = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1}
"""The fp8_format codes of csrc/kernels.h."""

MIN_CAPABILITY = (8, 9)


def fp8_problem(library: NativeLibrary) -> str | None:
    """Why the fp8 kernels cannot run on this process's GPU, or None; asked once a GPU is known to exist."""
    if library.runtime != "cuda":
        return f"the fp8 kernels are compiled for CUDA only; the {library.runtime.upper()} build leaves them out"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return (f"fp8 conversion needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer "
                f"(Ada, Hopper); this GPU has {capability[0]}.{capability[1]}")
    return None


def quantize_fp8(ext: ModuleType, x: Tensor, group_size: int = 128,
                 fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[Tensor, Tensor]:
    if group_size not in GROUP_SIZES or fp8_dtype not in FORMAT_CODES or not supported_float(x):
        return reference("quantize_fp8")(x, group_size, fp8_dtype)
    flat = dense(x).view(-1)
    numel = flat.numel()
    codes = torch.empty(x.shape, dtype=fp8_dtype, device=x.device)
    scales = torch.empty(-(-numel // group_size), dtype=torch.float32, device=x.device)
    with on_device(x):
        ext.quantize_fp8(flat.data_ptr(), codes.data_ptr(), scales.data_ptr(), numel, group_size,
                         FORMAT_CODES[fp8_dtype], dtype_code(x.dtype), stream())
    return codes, scales


def dequantize_fp8(ext: ModuleType, codes: Tensor, scales: Tensor, group_size: int = 128,
                   dtype: torch.dtype = torch.bfloat16) -> Tensor:
    numel = codes.numel()
    fits = (
        group_size in GROUP_SIZES and codes.dtype in FORMAT_CODES and codes.is_cuda
        and dtype in (torch.float32, torch.float16, torch.bfloat16)
        and scales.dtype == torch.float32 and scales.device == codes.device
        and scales.numel() == -(-numel // group_size)
    )
    if not fits:
        return reference("dequantize_fp8")(codes, scales, group_size, dtype)
    flat_codes = dense(codes).view(-1)
    flat_scales = dense(scales).view(-1)
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    with on_device(codes):
        ext.dequantize_fp8(flat_codes.data_ptr(), flat_scales.data_ptr(), out.data_ptr(), numel, group_size,
                           FORMAT_CODES[codes.dtype], dtype_code(dtype), stream())
    return out
