"""What every launcher needs: the stream, the device guard, alignment and fallbacks.

A launcher receives the loaded extension and torch tensors; it checks that the kernel
handles the case, passes raw addresses with ``torch.cuda.current_stream().cuda_stream``,
and otherwise runs the op's reference (core's registry knows it) so a caller never sees
a shape or dtype the kernel does not cover.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from ._native import DTYPE_CODES


def reference(op: str) -> Callable[..., Any]:
    """The plain-torch meaning of ``op``, run when a kernel does not cover a call."""
    from ds.core.kernels import get_op

    return get_op(op).reference


def on_device(t: torch.Tensor) -> AbstractContextManager[Any]:
    """Make ``t``'s GPU current for the launch; free when it already is."""
    if t.device.index is None or t.device.index == torch.cuda.current_device():
        return nullcontext()
    return torch.cuda.device(t.device)


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def supported_float(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or (t.is_cuda and t.dtype in DTYPE_CODES) for t in tensors)


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and 16-byte aligned, copying only when it is not already.

    The kernels take their 16-byte vector path whenever sizes allow it, so a launcher
    never hands them a view that starts mid-vector.
    """
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def vector_width(*tensors: torch.Tensor | None) -> int:
    """Elements per 16-byte access for the narrowest element type among ``tensors``."""
    return max(16 // t.element_size() for t in tensors if t is not None)


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


@functools.cache
def multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count

