"""``ds::woq_matmul`` for decoding on the kernels of csrc/woq_matmul.cu: 1 to 4 rows of x.

The kernels are GEMVs built for reading the weight once; batches of more rows (prefill) are
matmuls, which they do not take. Core picks one backend per op and input dtypes, not per
shape, and the decoding shape is what it times (:mod:`ds.core.kernels.autotune`), so this
launcher is where a call the kernels do not cover is handed on: to the Triton kernel, whose
tiled path is built for those batches, where triton can be imported, else to the op's torch
reference (what ran before either kernel existed).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from ._launch import dense, on_device, reference, stream, supported_float
from ._native import dtype_code
from .opdefs import BITS, GROUP_SIZES

MAX_ROWS = 4
"""Rows of x the kernels take (csrc kWoqMaxRows): decoding a batch of up to 4 sequences."""

_INT32_MAX = 2**31 - 1


def covers(x: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor | None, bits: int, group_size: int) -> bool:
    """Whether the kernels run this call: 1-4 rows of float x on a GPU and a weight they can read."""
    if bits not in BITS or group_size not in GROUP_SIZES or x.dim() == 0 or not supported_float(x):
        return False
    k = x.shape[-1]
    if k == 0 or k % group_size or not 1 <= x.numel() // k <= MAX_ROWS:
        return False
    groups_per_row = k // group_size
    if scales.dtype != torch.float32 or scales.numel() == 0 or scales.numel() % groups_per_row:
        return False
    n = scales.numel() // groups_per_row
    symmetric = offsets is None or offsets.numel() == 0
    return (
        n <= _INT32_MAX and k <= _INT32_MAX
        and all(t.device == x.device for t in (qweight, scales, offsets) if t is not None)
        and qweight.element_size() == 1 and not qweight.is_floating_point() and qweight.numel() * 8 == n * k * bits
        and (symmetric or (offsets.dtype == torch.float32 and offsets.numel() == scales.numel()))  # type: ignore[union-attr]
    )


@functools.cache
def larger_batches() -> Callable[..., Any]:
    """What runs the calls the kernels do not cover: Triton's woq_matmul if triton imports, else the reference."""
    if importlib.util.find_spec("triton") is not None:
        try:
            from .triton_kernels.woq_matmul import woq_matmul as triton_woq_matmul
        except Exception:  # noqa: BLE001 - a triton that fails to import leaves the reference
            return reference("woq_matmul")
        return triton_woq_matmul
    return reference("woq_matmul")


def woq_matmul(ext: ModuleType, x: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor | None, bits: int,
               group_size: int) -> Tensor:
    if not covers(x, qweight, scales, offsets, bits, group_size):
        return larger_batches()(x, qweight, scales, offsets, bits, group_size)
    k = x.shape[-1]
    rows = dense(x.reshape(-1, k))
    n = scales.numel() * group_size // k
    symmetric = offsets is None or offsets.numel() == 0
    codes = dense(qweight.reshape(-1))
    flat_scales = dense(scales.reshape(-1))
    flat_offsets = None if symmetric else dense(offsets.reshape(-1))  # type: ignore[union-attr]
    y = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    with on_device(x):
        ext.woq_matmul(rows.data_ptr(), codes.data_ptr(), flat_scales.data_ptr(),
                       0 if flat_offsets is None else flat_offsets.data_ptr(), y.data_ptr(), rows.shape[0], n, k,
                       group_size, bits, symmetric, dtype_code(x.dtype), stream())
    return y.reshape(*x.shape[:-1], n)
