"""SwiGLU and bias+GeLU, forward and backward, on the kernels of csrc/activations.cu."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from ._launch import (
    dense,
    on_device,
    reference,
    stream,
    supported_float,
)
from ._native import dtype_code

_APPROXIMATIONS = {"none": False, "tanh": True}


def swiglu(ext: ModuleType, x: Tensor) -> Tensor:
    if x.dim() == 0 or x.shape[-1] % 2 or not supported_float(x):
        return reference("swiglu")(x)
    hidden = x.shape[-1] // 2
    x2 = dense(x).view(-1, 2 * hidden)
    y = torch.empty(x2.shape[0], hidden, dtype=x.dtype, device=x.device)
    with on_device(x):
        ext.swiglu_forward(x2.data_ptr(), y.data_ptr(), x2.shape[0], hidden, dtype_code(x.dtype), stream())
    return y.view(*x.shape[:-1], hidden)


def swiglu_backward(ext: ModuleType, grad_output: Tensor, x: Tensor) -> Tensor:
    if (x.dim() == 0 or x.shape[-1] % 2 or not supported_float(x, grad_output)
            or grad_output.shape != (*x.shape[:-1], x.shape[-1] // 2)):
        return reference("swiglu_backward")(grad_output, x)
    hidden = x.shape[-1] // 2
    x2 = dense(x).view(-1, 2 * hidden)
    g2 = dense(grad_output.to(x.dtype)).view(-1, hidden)
    dx = torch.empty_like(x2)
    with on_device(x):
        ext.swiglu_backward(g2.data_ptr(), x2.data_ptr(), dx.data_ptr(), x2.shape[0], hidden, dtype_code(x.dtype),
                            stream())
    return dx.view(x.shape)


def _bias_gelu_fits(x: Tensor, bias: Tensor, approximate: str) -> bool:
    return (x.dim() > 0 and approximate in _APPROXIMATIONS and supported_float(x, bias) and bias.dtype == x.dtype
            and bias.shape == x.shape[-1:] and bias.device == x.device)


def bias_gelu(ext: ModuleType, x: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    if not _bias_gelu_fits(x, bias, approximate):
        return reference("bias_gelu")(x, bias, approximate)
    hidden = x.shape[-1]
    x2 = dense(x).view(-1, hidden)
    bias = dense(bias)
    y = torch.empty_like(x2)
    with on_device(x):
        ext.bias_gelu_forward(x2.data_ptr(), bias.data_ptr(), y.data_ptr(), x2.shape[0], hidden,
                              _APPROXIMATIONS[approximate], dtype_code(x.dtype), stream())
    return y.view(x.shape)


def bias_gelu_backward(ext: ModuleType, grad_output: Tensor, x: Tensor, bias: Tensor,
                       approximate: str = "none") -> tuple[Tensor, Tensor]:
    if not _bias_gelu_fits(x, bias, approximate) or grad_output.shape != x.shape or not supported_float(grad_output):
        return reference("bias_gelu_backward")(grad_output, x, bias, approximate)
    hidden = x.shape[-1]
    x2 = dense(x).view(-1, hidden)
    g2 = dense(grad_output.to(x.dtype)).view(-1, hidden)
    bias = dense(bias)
    rows = x2.shape[0]
    dx = torch.empty_like(x2)
    dbias = torch.empty_like(bias)
    # One wave of blocks, each owning a tile of columns and every gridDim.y-th group of rows,
    # and each writing one partial row of dbias.
    with on_device(x):
        partials = ext.bias_gelu_backward_partials(rows, hidden, _APPROXIMATIONS[approximate], dtype_code(x.dtype))
        dbias_partial = torch.empty(partials, hidden, dtype=torch.float32, device=x.device)
        s = stream()
        ext.bias_gelu_backward(g2.data_ptr(), x2.data_ptr(), bias.data_ptr(), dx.data_ptr(), dbias_partial.data_ptr(),
                               rows, hidden, partials, _APPROXIMATIONS[approximate], dtype_code(x.dtype), s)
        ext.column_sum(dbias_partial.data_ptr(), dbias.data_ptr(), partials, hidden, dtype_code(bias.dtype), s)
    return dx.view(x.shape), dbias
