"""The fp8 block quantizers this package adds to ds, each defined by its plain-torch reference.

* ``quantize_fp8(x, group_size, fp8_dtype) -> (codes, scales)``: x flattened into groups
  of ``group_size`` (32/64/128/256; the last may be short), one float32 scale per group,
  ``scale = amax / fp8_max`` (448 for ``torch.float8_e4m3fn``, 57344 for
  ``torch.float8_e5m2``); ``codes = x * (1 / scale)`` clamped to ``+-fp8_max`` (saturating,
  never inf or NaN from a finite input) and rounded to nearest even, in x's shape. An
  all-zero group has scale 0 and zero codes.
* ``dequantize_fp8(codes, scales, group_size, dtype)``: ``codes * scale`` of each element's
  group, in ``dtype`` and the codes' shape.

Scaling by the float32 reciprocal, as the kernels do, makes codes of both agree exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .opdefs import GROUP_SIZES

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _check_fp8_spec(group_size: int, fp8_dtype: torch.dtype) -> None:
    torch._check(group_size in GROUP_SIZES, lambda: f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    torch._check(fp8_dtype in FP8_DTYPES,
                 lambda: f"fp8_dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {fp8_dtype}")


def quantize_fp8(x: Tensor, group_size: int = 128,
                 fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[Tensor, Tensor]:
    """fp8 codes in x's shape and one float32 scale per group of the flattened x."""
    _check_fp8_spec(group_size, fp8_dtype)
    flat = x.reshape(-1).float()
    numel = flat.numel()
    groups = -(-numel // group_size)
    pad = groups * group_size - numel
    grouped = torch.cat([flat, flat.new_zeros(pad)]).view(groups, group_size)  # zeros leave amax alone
    fp8_max = torch.finfo(fp8_dtype).max
    amax = grouped.abs().amax(dim=1)
    # A tensor divisor: torch turns division by a Python scalar into multiplication by its
    # reciprocal, which can differ from the kernels' correctly rounded quotient in the last bit.
    scales = amax / torch.full_like(amax, fp8_max)
    inverse = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    codes = (grouped * inverse[:, None]).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    return codes.reshape(-1)[:numel].reshape(x.shape), scales


def dequantize_fp8(codes: Tensor, scales: Tensor, group_size: int = 128,
                   dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The values :func:`quantize_fp8` codes stand for, in ``dtype`` and the codes' shape."""
    _check_fp8_spec(group_size, codes.dtype)
    numel = codes.numel()
    torch._check(scales.numel() == -(-numel // group_size),
                 lambda: f"{numel} codes in groups of {group_size} need {-(-numel // group_size)} scales, "
                 f"got {scales.numel()}: pass the scales quantize_fp8 returned with these codes")
    group = torch.arange(numel, device=codes.device) // group_size
    return (codes.reshape(-1).float() * scales.reshape(-1).float()[group]).to(dtype).reshape(codes.shape)


def define_fp8_ops(define: Callable[..., None]) -> None:
    """Declare the fp8 ops through core's ``define`` callable."""
    define("quantize_fp8", quantize_fp8)
    define("dequantize_fp8", dequantize_fp8)


FP8_OPS: tuple[str, ...] = ("quantize_fp8", "dequantize_fp8")
