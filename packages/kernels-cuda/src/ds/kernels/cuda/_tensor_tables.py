"""The device tables the multi-tensor optimizer kernels read (csrc/multi_tensor.h), cached.

Adam and LAMB take one table row per tensor, ``[param, grad, exp_avg, exp_avg_sq,
param_copy (0 = none), numel, first_chunk]``, and one launch per combination of dtypes. A
table depends only on the tensors' addresses and sizes, which stay fixed for an optimizer's
lifetime, so tables are cached by that key and a step costs no host-to-device copy after
the first.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._native import DTYPE_CODES, dtype_code

_CACHE_SIZE = 16


class DeviceCache:
    """Device tensors built once per key, least recently used evicted first."""

    def __init__(self) -> None:
        self._tensors: OrderedDict[tuple[int, ...], Tensor] = OrderedDict()

    def get(self, key: tuple[int, ...], build: Callable[[], Tensor]) -> Tensor:
        tensor = self._tensors.get(key)
        if tensor is None:
            tensor = build()
            self._tensors[key] = tensor
            if len(self._tensors) > _CACHE_SIZE:
                self._tensors.popitem(last=False)
        else:
            self._tensors.move_to_end(key)
        return tensor


_tables = DeviceCache()


@dataclass(frozen=True)
class TableLaunch:
    """One kernel launch: the tensors of one dtype combination and their device table."""

    param_code: int
    grad_code: int
    copy_code: int  # -1: no low-precision copy
    table: Tensor
    key: tuple[int, ...]
    num_tensors: int
    total_chunks: int
    vectorized: bool


def covered(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
            low: list[Tensor]) -> bool:
    """Whether the kernels handle these lists: one GPU, dense tensors, float32 moments."""
    device = params[0].device
    lows: list[Tensor | None] = list(low) or [None] * len(params)
    for p, g, m, v, c in zip(params, grads, exp_avgs, exp_avg_sqs, lows):
        tensors = (p, g, m, v) if c is None else (p, g, m, v, c)
        if any(t.device != device or not t.is_contiguous() or t.dtype not in DTYPE_CODES for t in tensors):
            return False
        if m.dtype != torch.float32 or v.dtype != torch.float32:
            return False
        if any(t.numel() != p.numel() for t in tensors):
            return False
    return device.type == "cuda"


def _build_table(rows: list[tuple[int, ...]], device: torch.device) -> Tensor:
    table = torch.tensor(rows, dtype=torch.int64).pin_memory()
    return table.to(device, non_blocking=True)


def tensor_tables(chunk: int, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                  exp_avg_sqs: list[Tensor], low: list[Tensor]) -> list[TableLaunch]:
    """The launches that cover every non-empty tensor, ``chunk`` elements per block."""
    groups: dict[tuple[int, int, int], list[tuple[int, ...]]] = {}
    lows: list[Tensor | None] = list(low) or [None] * len(params)
    for p, g, m, v, c in zip(params, grads, exp_avgs, exp_avg_sqs, lows):
        if p.numel() == 0:
            continue
        codes = (dtype_code(p.dtype), dtype_code(g.dtype), -1 if c is None else dtype_code(c.dtype))
        groups.setdefault(codes, []).append(
            (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), 0 if c is None else c.data_ptr(), p.numel()))
    device = params[0].device
    launches = []
    for (param_code, grad_code, copy_code), tensors in groups.items():
        rows, first_chunk = [], 0
        for row in tensors:
            rows.append((*row, first_chunk))
            first_chunk += math.ceil(row[5] / chunk)
        key = tuple(x for row in rows for x in row)
        table = _tables.get(key, lambda rows=rows: _build_table(rows, device))
        vectorized = all(address % 16 == 0 for row in tensors for address in row[:5])
        launches.append(TableLaunch(param_code, grad_code, copy_code, table, key, len(rows), first_chunk, vectorized))
    return launches
