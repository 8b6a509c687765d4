"""One Adam, AdamW or Adagrad update of a single fp32 CPU buffer, native or in torch ops.

These functions are the layer ZeRO-Offload needs: master weights, gradients and states
live in flat CPU buffers (often pinned), a rank updates slices of them, and the bf16 or
fp16 copy that goes back to the accelerator is written in the same pass over memory
(``low_precision_param``), so the update costs one read of each buffer and one write.
Slices of a 1-D buffer are fine: anything contiguous is.

The scalar arithmetic (bias corrections, step size) is done here in Python doubles
exactly as ``torch.optim.Adam`` and ``torch.optim.Adagrad`` do it; the native loops only
stream memory. The torch path is the same update in torch ops, so both agree with torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

import torch

from ds.core.errors import DsError
from ds.zero._native import TORCH_PATH, native_extension


class CPUOptimizerInputError(DsError, ValueError):
    """A tensor handed to a CPU optimizer update has the wrong device, dtype or layout."""


_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_COPY_DTYPES = (torch.bfloat16, torch.float16)


def _dtype_code(module: object, dtype: torch.dtype | None) -> int:
    names = {None: "DTYPE_NONE", torch.float32: "DTYPE_FLOAT32",
             torch.bfloat16: "DTYPE_BFLOAT16", torch.float16: "DTYPE_FLOAT16"}
    return int(getattr(module, names[dtype]))


def _check(name: str, tensor: torch.Tensor, numel: int, dtypes: tuple[torch.dtype, ...]) -> None:
    problem = None
    if tensor.device.type != "cpu":
        problem = f"is on {tensor.device}; CPU optimizers update CPU tensors (offload them first)"
    elif tensor.dtype not in dtypes:
        problem = f"has dtype {tensor.dtype}; expected one of {', '.join(map(str, dtypes))}"
    elif tensor.layout != torch.strided or not tensor.is_contiguous():
        problem = "is not a contiguous dense tensor; pass tensor.contiguous() (or a flat buffer)"
    elif tensor.numel() != numel:
        problem = f"has {tensor.numel()} elements but the parameter has {numel}"
    if problem is not None:
        raise CPUOptimizerInputError(f"{name} {problem}")


def _check_buffers(param: torch.Tensor, grad: torch.Tensor, states: dict[str, torch.Tensor],
                   low_precision_param: torch.Tensor | None) -> None:
    numel = param.numel()
    _check("param", param, numel, (torch.float32,))
    _check("grad", grad, numel, _GRAD_DTYPES)
    for name, state in states.items():
        _check(f"optimizer state {name!r}", state, numel, (torch.float32,))
    if low_precision_param is not None:
        _check("low_precision_param", low_precision_param, numel, _COPY_DTYPES)


@dataclass(frozen=True)
class AdamScalars:
    """The per-step scalars of torch's Adam formula, computed once per parameter group."""

    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    step_size: float
    bias_correction2_sqrt: float
    l2_weight_decay: float
    param_decay: float

    @classmethod
    def for_step(cls, *, step: int, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, decoupled_weight_decay: bool,
                 bias_correction: bool = True) -> AdamScalars:
        beta1, beta2 = betas
        bias_correction1 = 1 - beta1**step if bias_correction else 1.0
        bias_correction2 = 1 - beta2**step if bias_correction else 1.0
        return cls(
            one_minus_beta1=1 - beta1,
            beta2=beta2,
            one_minus_beta2=1 - beta2,
            eps=eps,
            step_size=lr / bias_correction1,
            bias_correction2_sqrt=math.sqrt(bias_correction2),
            l2_weight_decay=0.0 if decoupled_weight_decay else weight_decay,
            param_decay=1 - lr * weight_decay if decoupled_weight_decay else 1.0,
        )


def _native_buffers(param: torch.Tensor, grad: torch.Tensor,
                    low_precision_param: torch.Tensor | None) -> tuple[ModuleType, dict[str, int]]:
    """The loaded extension and the keyword arguments every native step takes alike.

    The kernels read raw addresses, so the buffers go over as pointers plus dtype codes;
    ``copy`` 0 tells the kernel there is no low-precision copy to write.
    """
    native = native_extension().module
    assert native is not None, "resolve_isa() hands out native paths only when loaded"
    copy_dtype = None if low_precision_param is None else low_precision_param.dtype
    return native, {
        "param": param.data_ptr(), "grad": grad.data_ptr(), "grad_dtype": _dtype_code(native, grad.dtype),
        "copy": 0 if low_precision_param is None else low_precision_param.data_ptr(),
        "copy_dtype": _dtype_code(native, copy_dtype), "numel": param.numel(),
    }


def _float_grad(grad: torch.Tensor, grad_multiplier: float) -> torch.Tensor:
    grad = grad if grad.dtype == torch.float32 else grad.float()
    return grad * grad_multiplier if grad_multiplier != 1.0 else grad


def adam_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    scalars: AdamScalars,
    *,
    isa: str,
    grad_multiplier: float = 1.0,
    low_precision_param: torch.Tensor | None = None,
) -> None:
    """Update ``param``, ``exp_avg`` and ``exp_avg_sq`` in place by one Adam/AdamW step.

    ``grad`` may be fp32, bf16 or fp16 and is multiplied by ``grad_multiplier`` first
    (fold 1/loss-scale and the clipping coefficient in here to save a pass). When
    ``low_precision_param`` (bf16 or fp16) is given it receives the updated parameter,
    rounded to nearest even, written in the same pass.
    """
    _check_buffers(param, grad, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq},
                   low_precision_param)
    if isa == TORCH_PATH:
        g = _float_grad(grad, grad_multiplier)
        if scalars.l2_weight_decay != 0:
            g = g.add(param, alpha=scalars.l2_weight_decay)
        if scalars.param_decay != 1.0:
            param.mul_(scalars.param_decay)
        exp_avg.lerp_(g, scalars.one_minus_beta1)
        exp_avg_sq.mul_(scalars.beta2).addcmul_(g, g, value=scalars.one_minus_beta2)
        denom = (exp_avg_sq.sqrt() / scalars.bias_correction2_sqrt).add_(scalars.eps)
        param.addcdiv_(exp_avg, denom, value=-scalars.step_size)
        if low_precision_param is not None:
            low_precision_param.copy_(param)
        return
    native, buffers = _native_buffers(param, grad, low_precision_param)
    native.adam_step(
        **buffers, exp_avg=exp_avg.data_ptr(), exp_avg_sq=exp_avg_sq.data_ptr(),
        one_minus_beta1=scalars.one_minus_beta1, beta2=scalars.beta2,
        one_minus_beta2=scalars.one_minus_beta2, eps=scalars.eps,
        step_size=scalars.step_size, bias_correction2_sqrt=scalars.bias_correction2_sqrt,
        l2_weight_decay=scalars.l2_weight_decay, param_decay=scalars.param_decay,
        grad_multiplier=grad_multiplier, isa=isa,
    )


def adagrad_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    state_sum: torch.Tensor,
    *,
    step: int,
    lr: float,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    isa: str,
    grad_multiplier: float = 1.0,
    low_precision_param: torch.Tensor | None = None,
) -> None:
    """Update ``param`` and ``state_sum`` in place by one Adagrad step (torch's formula).

    ``grad``, ``grad_multiplier`` and ``low_precision_param`` work as in :func:`adam_update_`.
    """
    _check_buffers(param, grad, {"sum": state_sum}, low_precision_param)
    clr = lr / (1 + (step - 1) * lr_decay)
    if isa == TORCH_PATH:
        g = _float_grad(grad, grad_multiplier)
        if weight_decay != 0:
            g = g.add(param, alpha=weight_decay)
        state_sum.addcmul_(g, g, value=1)
        param.addcdiv_(g, state_sum.sqrt().add_(eps), value=-clr)
        if low_precision_param is not None:
            low_precision_param.copy_(param)
        return
    native, buffers = _native_buffers(param, grad, low_precision_param)
    native.adagrad_step(
        **buffers, sum=state_sum.data_ptr(), clr=clr, eps=eps, weight_decay=weight_decay,
        grad_multiplier=grad_multiplier, isa=isa,
    )
