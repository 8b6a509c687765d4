"""Cross-entropy with the logits gradient written in place, on the kernel of csrc/cross_entropy.cu."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from ._launch import on_device, reference, stream, supported_float
from ._native import dtype_code


def _rows_in_place(logits: Tensor) -> bool:
    """Whether the kernel can write ``logits`` itself: unit column stride, rows that do not overlap."""
    rows, vocab = logits.shape
    return logits.stride(1) == 1 and (rows <= 1 or logits.stride(0) >= vocab)


def cross_entropy_fwd_bwd(ext: ModuleType, logits: Tensor, target: Tensor, ignore_index: int = -100,
                          label_smoothing: float = 0.0, grad_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    if (logits.dim() != 2 or not supported_float(logits) or target.shape != logits.shape[:1]
            or target.device != logits.device or target.dtype.is_floating_point or logits.shape[1] == 0):
        return reference("cross_entropy_fwd_bwd")(logits, target, ignore_index, label_smoothing, grad_scale)
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    if rows == 0:
        return loss, lse
    # Any row stride works (a slice of a wider buffer stays in place); anything else is
    # computed in a contiguous copy and written back.
    work = logits if _rows_in_place(logits) else logits.contiguous()
    labels = target.to(torch.int64).contiguous()
    with on_device(logits):
        ext.cross_entropy_fwd_bwd(work.data_ptr(), work.stride(0), labels.data_ptr(), loss.data_ptr(), lse.data_ptr(),
                                  rows, vocab, int(ignore_index), float(label_smoothing), float(grad_scale),
                                  dtype_code(logits.dtype), stream())
    if work is not logits:
        logits.copy_(work)
    return loss, lse
