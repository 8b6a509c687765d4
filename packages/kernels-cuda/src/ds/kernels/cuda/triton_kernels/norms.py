"""RMSNorm and LayerNorm, forward and backward, as Triton kernels with the ds ops' signatures.

Forward: a row up to :data:`MAX_FUSED_HIDDEN` wide is read once and kept in registers
(several short rows share a program so every program moves enough bytes); a wider row is
streamed in chunks, re-reading it for each statistic. Backward: each of a few programs per
multiprocessor walks a strided set of rows, keeping the weight and its partial weight/bias
gradients in registers; the partials are summed over programs afterwards. Statistics are
recomputed, never saved, exactly as the references in :mod:`ds.core.kernels.reference` do.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import floats, interpreting, reference, rows_of

MAX_FUSED_HIDDEN = 16384
"""Widest row a program keeps in registers; wider forwards stream, wider backwards run the reference."""

_TILE = 4096
"""Elements a forward program aims to hold: short rows are batched up to this many."""


@triton.jit
def _norm_forward(x_ptr, w_ptr, b_ptr, y_ptr, rows, hidden, stride_xr, stride_xc, eps,
                  RMS: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                  FUSED: tl.constexpr):
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    row_mask = row < rows
    x_row = x_ptr + row * stride_xr
    y_row = y_ptr + row * hidden
    if FUSED:
        col = tl.arange(0, BLOCK)[None, :]
        mask = row_mask & (col < hidden)
        x = tl.load(x_row + col * stride_xc, mask=mask, other=0.0).to(tl.float32)
        if RMS:
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / hidden + eps)
            normed = x * rstd[:, None]
        else:
            mean = tl.sum(x, axis=1) / hidden
            diff = tl.where(mask, x - mean[:, None], 0.0)
            rstd = tl.rsqrt(tl.sum(diff * diff, axis=1) / hidden + eps)
            normed = diff * rstd[:, None]
        y = normed * tl.load(w_ptr + col, mask=col < hidden, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + col, mask=col < hidden, other=0.0).to(tl.float32)
        tl.store(y_row + col, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:  # one row per program, streamed in BLOCK-wide chunks
        mean = 0.0
        if not RMS:
            total = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
            for start in range(0, hidden, BLOCK):
                col = start + tl.arange(0, BLOCK)[None, :]
                total += tl.load(x_row + col * stride_xc, mask=row_mask & (col < hidden), other=0.0).to(tl.float32)
            mean = tl.sum(total, axis=1)[:, None] / hidden
        squares = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for start in range(0, hidden, BLOCK):
            col = start + tl.arange(0, BLOCK)[None, :]
            mask = row_mask & (col < hidden)
            x = tl.load(x_row + col * stride_xc, mask=mask, other=0.0).to(tl.float32)
            diff = tl.where(mask, x - mean, 0.0)
            squares += diff * diff
        rstd = tl.rsqrt(tl.sum(squares, axis=1)[:, None] / hidden + eps)
        for start in range(0, hidden, BLOCK):
            col = start + tl.arange(0, BLOCK)[None, :]
            mask = row_mask & (col < hidden)
            x = tl.load(x_row + col * stride_xc, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd * tl.load(w_ptr + col, mask=col < hidden, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(b_ptr + col, mask=col < hidden, other=0.0).to(tl.float32)
            tl.store(y_row + col, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_backward(g_ptr, x_ptr, w_ptr, dx_ptr, dw_partial_ptr, db_partial_ptr, rows, hidden,
                   stride_gr, stride_gc, stride_xr, stride_xc, eps,
                   RMS: tl.constexpr, BLOCK: tl.constexpr):
    program = tl.program_id(0)
    col = tl.arange(0, BLOCK)
    mask = col < hidden
    w = tl.load(w_ptr + col, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(program, rows, tl.num_programs(0)):
        r = tl.cast(row, tl.int64)
        x = tl.load(x_ptr + r * stride_xr + col * stride_xc, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + r * stride_gr + col * stride_gc, mask=mask, other=0.0).to(tl.float32)
        if RMS:
            rstd = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
            normed = x * rstd
        else:
            diff = tl.where(mask, x - tl.sum(x, axis=0) / hidden, 0.0)
            rstd = tl.rsqrt(tl.sum(diff * diff, axis=0) / hidden + eps)
            normed = diff * rstd
        grad_normed = g * w
        dx = grad_normed - normed * (tl.sum(grad_normed * normed, axis=0) / hidden)
        if not RMS:
            dx -= tl.sum(grad_normed, axis=0) / hidden
            db += g
        tl.store(dx_ptr + r * hidden + col, (dx * rstd).to(dx_ptr.dtype.element_ty), mask=mask)
        dw += g * normed
    tl.store(dw_partial_ptr + program * hidden + col, dw, mask=mask)
    if not RMS:
        tl.store(db_partial_ptr + program * hidden + col, db, mask=mask)


@functools.cache
def _programs_per_pass(device_index: int) -> int:
    """Backward programs: enough to fill every multiprocessor a few times over."""
    return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count


def _warps(elements: int) -> int:
    return max(1, min(16, triton.next_power_of_2(elements) // 512))


def _fits(x: Tensor, weight: Tensor, bias: Tensor | None, *, max_hidden: int | None = None) -> bool:
    if x.dim() == 0 or x.numel() == 0 or not floats(x, weight, bias):
        return False
    hidden = x.shape[-1]
    shapes_match = weight.shape == (hidden,) and (bias is None or bias.shape == (hidden,))
    return shapes_match and (max_hidden is None or hidden <= max_hidden)


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, rms: bool) -> Tensor:
    x2 = rows_of(x)
    rows, hidden = x2.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(hidden)
    fused = block <= MAX_FUSED_HIDDEN
    block = block if fused else MAX_FUSED_HIDDEN // 2
    rows_per_program = max(1, min(_TILE // block, triton.next_power_of_2(rows))) if fused else 1
    _norm_forward[(triton.cdiv(rows, rows_per_program),)](
        x2, weight, bias if bias is not None else weight, y, rows, hidden, x2.stride(0), x2.stride(1), eps,
        RMS=rms, HAS_BIAS=bias is not None, ROWS=rows_per_program, BLOCK=block, FUSED=fused,
        num_warps=_warps(rows_per_program * block),
    )
    return y


def _backward(grad_output: Tensor, x: Tensor, weight: Tensor, eps: float, rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    """dx and the float32 weight and bias gradients (the bias one is meaningless for RMSNorm)."""
    x2, g2 = rows_of(x), rows_of(grad_output)
    rows, hidden = x2.shape
    device_index = x.device.index if x.device.index is not None else 0
    programs = min(rows, 4 if interpreting() else _programs_per_pass(device_index))
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw_partial = torch.empty(programs, hidden, dtype=torch.float32, device=x.device)
    db_partial = dw_partial if rms else torch.empty_like(dw_partial)
    block = triton.next_power_of_2(hidden)
    _norm_backward[(programs,)](
        g2, x2, weight, dx, dw_partial, db_partial, rows, hidden, g2.stride(0), g2.stride(1),
        x2.stride(0), x2.stride(1), eps, RMS=rms, BLOCK=block, num_warps=_warps(2 * block),
    )
    return dx, dw_partial.sum(0), db_partial.sum(0)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    if not _fits(x, weight, None):
        return reference("rms_norm")(x, weight, eps)
    return _forward(x, weight, None, eps, rms=True)


def rms_norm_backward(grad_output: Tensor, x: Tensor, weight: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    if not _fits(x, weight, None, max_hidden=MAX_FUSED_HIDDEN) or grad_output.shape != x.shape \
            or not floats(grad_output, x):
        return reference("rms_norm_backward")(grad_output, x, weight, eps)
    dx, dweight, _ = _backward(grad_output, x, weight, eps, rms=True)
    return dx, dweight.to(weight.dtype)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    if not _fits(x, weight, bias):
        return reference("layer_norm")(x, weight, bias, eps)
    return _forward(x, weight, bias, eps, rms=False)


def layer_norm_backward(grad_output: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None = None,
                        eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    if not _fits(x, weight, bias, max_hidden=MAX_FUSED_HIDDEN) or grad_output.shape != x.shape \
            or not floats(grad_output, x):
        return reference("layer_norm_backward")(grad_output, x, weight, bias, eps)
    dx, dweight, dbias = _backward(grad_output, x, weight, eps, rms=False)
    return dx, dweight.to(weight.dtype), dbias.to(weight.dtype if bias is None else bias.dtype)
