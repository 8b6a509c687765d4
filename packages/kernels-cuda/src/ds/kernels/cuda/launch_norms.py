"""RMSNorm and LayerNorm, forward and backward, on the fused kernels of csrc/norms.cu and
csrc/norm_backward.cu."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from ._launch import (
    dense,
    on_device,
    ptr,
    reference,
    stream,
    supported_float,
    vector_width,
)
from ._native import dtype_code


def _fits(ext: ModuleType, x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the kernels cover this call: float dtypes, one device, hidden within limits."""
    hidden = x.shape[-1] if x.dim() > 0 else 0
    if x.dim() == 0 or hidden == 0 or not supported_float(x, weight, bias):
        return False
    if weight.shape != (hidden,) or (bias is not None and bias.shape != (hidden,)):
        return False
    if any(t is not None and t.device != x.device for t in (weight, bias)):
        return False
    vectorized = hidden % vector_width(x, weight, bias) == 0
    return hidden <= ext.norm_max_hidden(vectorized)


def _kernel_params(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Weight and bias in one dtype the kernels are built for: the input's, or else float32.

    Any other pairing (an fp16 weight on bf16 input, a bias of another dtype) is upcast to
    float32, which is exact, so the kernels need no instance per dtype combination.
    """
    dtype = weight.dtype
    if dtype not in (x.dtype, torch.float32) or (bias is not None and bias.dtype != dtype):
        dtype = torch.float32
    return dense(weight.to(dtype)), None if bias is None else dense(bias.to(dtype))


def _forward(ext: ModuleType, x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, rms: bool) -> Tensor:
    hidden = x.shape[-1]
    x2 = dense(x).view(-1, hidden)
    weight, bias = _kernel_params(x, weight, bias)
    y = torch.empty_like(x2)
    with on_device(x):
        ext.norm_forward(x2.data_ptr(), weight.data_ptr(), ptr(bias), y.data_ptr(), 0, 0, x2.shape[0],
                         hidden, float(eps), rms, dtype_code(x.dtype), dtype_code(weight.dtype), stream())
    return y.view(x.shape)


def _backward(ext: ModuleType, grad: Tensor, x: Tensor, weight: Tensor, eps: float, rms: bool,
              bias_dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor | None]:
    hidden = x.shape[-1]
    x2 = dense(x).view(-1, hidden)
    g2 = dense(grad.to(x.dtype)).view(-1, hidden)
    kernel_weight, _ = _kernel_params(x, weight, None)
    rows = x2.shape[0]
    dx = torch.empty_like(x2)
    with on_device(x):
        partials = ext.norm_backward_partials(rows, hidden, rms, dtype_code(x.dtype), dtype_code(kernel_weight.dtype))
    dw_partial = torch.empty(partials, hidden, device=x.device, dtype=torch.float32)
    db_partial = None if rms else torch.empty_like(dw_partial)
    dweight = torch.empty(hidden, device=x.device, dtype=weight.dtype)
    dbias = None if bias_dtype is None else torch.empty(hidden, device=x.device, dtype=bias_dtype)
    with on_device(x):
        s = stream()
        if rows > 0:
            ext.norm_backward(g2.data_ptr(), x2.data_ptr(), kernel_weight.data_ptr(), dx.data_ptr(),
                              dw_partial.data_ptr(), ptr(db_partial), rows, hidden, float(eps), rms, partials,
                              dtype_code(x.dtype), dtype_code(kernel_weight.dtype), s)
        else:
            dw_partial.zero_()
            if db_partial is not None:
                db_partial.zero_()
        if dbias is not None and db_partial is not None:
            ext.column_sum2(dw_partial.data_ptr(), dweight.data_ptr(), dtype_code(weight.dtype), db_partial.data_ptr(),
                            dbias.data_ptr(), dtype_code(dbias.dtype), partials, hidden, s)
        else:
            ext.column_sum(dw_partial.data_ptr(), dweight.data_ptr(), partials, hidden, dtype_code(weight.dtype), s)
    return dx.view(x.shape), dweight, dbias


def rms_norm(ext: ModuleType, x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    if not _fits(ext, x, weight, None):
        return reference("rms_norm")(x, weight, eps)
    return _forward(ext, x, weight, None, eps, rms=True)


def rms_norm_backward(ext: ModuleType, grad_output: Tensor, x: Tensor, weight: Tensor,
                      eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    if not _fits(ext, x, weight, None) or grad_output.shape != x.shape or not supported_float(grad_output):
        return reference("rms_norm_backward")(grad_output, x, weight, eps)
    dx, dweight, _ = _backward(ext, grad_output, x, weight, eps, rms=True, bias_dtype=None)
    return dx, dweight


def layer_norm(ext: ModuleType, x: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    if not _fits(ext, x, weight, bias):
        return reference("layer_norm")(x, weight, bias, eps)
    return _forward(ext, x, weight, bias, eps, rms=False)


def layer_norm_backward(ext: ModuleType, grad_output: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None = None,
                        eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    if not _fits(ext, x, weight, bias) or grad_output.shape != x.shape or not supported_float(grad_output):
        return reference("layer_norm_backward")(grad_output, x, weight, bias, eps)
    bias_dtype = weight.dtype if bias is None else bias.dtype
    dx, dweight, dbias = _backward(ext, grad_output, x, weight, eps, rms=False, bias_dtype=bias_dtype)
    assert dbias is not None
    return dx, dweight, dbias
