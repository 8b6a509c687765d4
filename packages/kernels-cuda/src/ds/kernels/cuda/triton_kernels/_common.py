"""What every Triton launcher here shares: the interpreter switch, dtypes and the fallback."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

ROUND_MAGIC = 12582912.0
"""1.5 * 2**23: ``(v + ROUND_MAGIC) - ROUND_MAGIC`` rounds a float32 |v| < 2**22 to the
nearest integer, ties to even (what ``torch.round`` does), in plain IEEE additions that
both GPU compilers and triton's CPU interpreter honour; libdevice's ``rint`` does not run
in the interpreter."""


def interpreting() -> bool:
    """Whether triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_operands(dtype: torch.dtype) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"``: the operand type of a kernel's dots for inputs of ``dtype``.

    The interpreter multiplies bfloat16 matrices wrongly (numpy has no bfloat16), so there
    bf16 operands are widened to float32, which changes nothing but speed.
    """
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.bfloat16 and not interpreting():
        return "bf16"
    return "fp32"


def reference(op: str) -> Callable[..., Any]:
    """The plain-torch meaning of ``op``, run for the calls a kernel does not cover."""
    from ds.core.kernels import get_op

    return get_op(op).reference


def floats(*tensors: torch.Tensor | None) -> bool:
    """Every given tensor is a float32/16/bf16 tensor on one GPU (or on CPU when interpreting)."""
    present = [t for t in tensors if t is not None]
    device = present[0].device
    on_device = device.type == "cuda" or (interpreting() and device.type == "cpu")
    return on_device and all(t.dtype in FLOAT_DTYPES and t.device == device for t in present)


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """``x`` as [rows, last dimension], a view whenever the layout allows (strides go to the kernel)."""
    return x.reshape(-1, x.shape[-1])
