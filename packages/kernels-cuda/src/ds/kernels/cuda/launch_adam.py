"""Multi-tensor fused Adam/AdamW (csrc/adam.cu): one launch per dtype combination.

The kernel reads a device table with one row per tensor (addresses, size, first chunk).
A table depends only on the tensors' addresses and sizes, which stay fixed for an
optimizer's lifetime, so tables are cached by that key and a step costs no host-to-device
copy after the first.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from types import ModuleType

import torch
from torch import Tensor

from ._launch import on_device, reference, stream
from ._native import DTYPE_CODES, dtype_code

_TABLE_CACHE_SIZE = 16


class _TableCache:
    """Device copies of tensor tables, least recently used evicted first."""

    def __init__(self) -> None:
        self._tables: OrderedDict[tuple[int, ...], Tensor] = OrderedDict()

    def get(self, key: tuple[int, ...], build: functools.partial[Tensor]) -> Tensor:
        table = self._tables.get(key)
        if table is None:
            table = build()
            self._tables[key] = table
            if len(self._tables) > _TABLE_CACHE_SIZE:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return table


_tables = _TableCache()


def _covered(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
             low: list[Tensor]) -> bool:
    """Whether the kernel handles these lists: one GPU, dense tensors, float32 moments."""
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


def adam_step(ext: ModuleType, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
              exp_avg_sqs: list[Tensor], low_precision_params: list[Tensor], *, lr: float, beta1: float,
              beta2: float, eps: float, weight_decay: float, step: int, adamw: bool, bias_correction: bool) -> None:
    args = (params, grads, exp_avgs, exp_avg_sqs, low_precision_params)
    hyper = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay, "step": step,
             "adamw": adamw, "bias_correction": bias_correction}
    if not params or step < 1 or len(low_precision_params) not in (0, len(params)) or not _covered(*args):
        reference("adam_step")(*args, **hyper)
        return
    correction1 = 1.0 - beta1**step if bias_correction else 1.0
    correction2 = 1.0 - beta2**step if bias_correction else 1.0
    chunk = ext.ADAM_CHUNK
    groups: dict[tuple[int, int, int], list[tuple[int, ...]]] = {}
    lows: list[Tensor | None] = list(low_precision_params) or [None] * len(params)
    for p, g, m, v, c in zip(params, grads, exp_avgs, exp_avg_sqs, lows):
        if p.numel() == 0:
            continue
        key = (dtype_code(p.dtype), dtype_code(g.dtype), -1 if c is None else dtype_code(c.dtype))
        groups.setdefault(key, []).append(
            (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), 0 if c is None else c.data_ptr(), p.numel()))
    device = params[0].device
    with on_device(params[0]):
        s = stream()
        for (param_code, grad_code, copy_code), tensors in groups.items():
            rows, first_chunk = [], 0
            for row in tensors:
                rows.append((*row, first_chunk))
                first_chunk += math.ceil(row[5] / chunk)
            table_key = tuple(x for row in rows for x in row)
            table = _tables.get(table_key, functools.partial(_build_table, rows, device))
            vectorized = all(address % 16 == 0 for row in tensors for address in row[:5])
            ext.adam_step(table.data_ptr(), len(rows), first_chunk, param_code, grad_code, copy_code, vectorized,
                          lr, beta1, beta2, eps, weight_decay, correction1, correction2, 1.0, adamw, s)
