"""The meaning of core's ops, written in plain torch.

These functions are what ``torch.ops.ds.<op>`` runs when no faster backend is available,
what every backend is tested against, and (run on fake tensors) how torch.compile learns
the shapes of the ops. Norms and softmax compute in at least float32 (float64 stays
float64), as fused kernels do, and return contiguous outputs in the input's dtype: a compiled
graph checks the strides of a custom op's output against what this reference produced,
so every backend must return contiguous outputs too.

Backward ops take the upstream gradient first; their remaining arguments follow the
convention of :func:`ds.core.kernels.registry.define_op` (``saves="inputs"``: the
forward op's inputs; ``saves="output"``: the forward output, then the forward op's
non-tensor arguments).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_last_dim(x: Tensor, name: str, t: Tensor | None) -> None:
    if t is not None:
        torch._check(
            t.shape == x.shape[-1:],
            lambda: f"{name} has shape {tuple(t.shape)} but the input's last dimension is "
            f"{x.shape[-1]}: pass a 1-D {name} of size {x.shape[-1]}",
        )


def _compute(t: Tensor) -> Tensor:
    """``t`` contiguous, in the precision the arithmetic runs in."""
    return t.contiguous().to(torch.promote_types(t.dtype, torch.float32))


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMS normalization over the last dimension, scaled by ``weight``."""
    _check_last_dim(x, "weight", weight)
    xf = _compute(x)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * _compute(weight)).to(x.dtype)


def rms_norm_backward(grad_output: Tensor, x: Tensor, weight: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`rms_norm` for ``x`` and ``weight``; recomputes the statistics."""
    xf = _compute(x)
    grad = _compute(grad_output)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    normed = xf * rstd
    grad_normed = grad * _compute(weight)
    grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
    grad_weight = (grad * normed).reshape(-1, x.shape[-1]).sum(0)
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Layer normalization over the last dimension with an affine ``weight`` and optional ``bias``."""
    _check_last_dim(x, "weight", weight)
    _check_last_dim(x, "bias", bias)
    xf = _compute(x)
    mean = xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xf.var(-1, correction=0, keepdim=True) + eps)
    out = (xf - mean) * rstd * _compute(weight)
    if bias is not None:
        out = out + _compute(bias)
    return out.to(x.dtype)


def layer_norm_backward(
    grad_output: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-5
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`layer_norm` for ``x``, ``weight`` and ``bias``.

    The bias gradient is returned even when the forward had no bias (it is then unused),
    so the op has one fixed output signature for every backend.
    """
    xf = _compute(x)
    grad = _compute(grad_output)
    mean = xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xf.var(-1, correction=0, keepdim=True) + eps)
    normed = (xf - mean) * rstd
    grad_normed = grad * _compute(weight)
    grad_x = rstd * (
        grad_normed
        - grad_normed.mean(-1, keepdim=True)
        - normed * (grad_normed * normed).mean(-1, keepdim=True)
    )
    rows = grad.reshape(-1, x.shape[-1])
    grad_weight = (rows * normed.reshape(-1, x.shape[-1])).sum(0)
    grad_bias = rows.sum(0)
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype), grad_bias.to(bias_dtype)


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """Softmax along ``dim``, accumulated in float32."""
    return torch.softmax(_compute(x), dim).to(x.dtype)


def softmax_backward(grad_output: Tensor, output: Tensor, dim: int = -1) -> Tensor:
    """Gradient of :func:`softmax` from its output, which the next matmul keeps alive anyway."""
    y = _compute(output)
    grad = _compute(grad_output)
    return (y * (grad - (grad * y).sum(dim, keepdim=True))).to(output.dtype)


def _check_optimizer_lists(op: str, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                           exp_avg_sqs: list[Tensor], low_precision_params: list[Tensor], step: int) -> None:
    """The list lengths and step count every multi-tensor optimizer op needs."""
    count = len(params)
    for name, tensors in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        if len(tensors) != count:
            raise ValueError(f"{op} got {count} params but {len(tensors)} {name}; pass one per param")
    if len(low_precision_params) not in (0, count):
        raise ValueError(f"{op} got {count} params but {len(low_precision_params)} low_precision_params; "
                         "pass one per param, or an empty list")
    if step < 1:
        raise ValueError(f"{op} step must count from 1, got {step}")


def adam_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    low_precision_params: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    adamw: bool,
    bias_correction: bool,
    grad_scale: float = 1.0,
) -> None:
    """One Adam/AdamW update of many tensors in place, as ``torch.optim.Adam``/``AdamW`` do.

    ``adamw=True`` decays the weights directly (AdamW); ``False`` adds ``weight_decay *
    param`` to the gradient (Adam's L2 penalty). ``step`` counts from 1. When
    ``low_precision_params`` is non-empty, each updated parameter is also copied into
    the matching tensor (for example the bf16 weights the model computes with), which a
    fused kernel does in the same pass. Each gradient is multiplied by ``grad_scale`` as it
    is read (the engine's loss-scale and clipping factor), so no pass rewrites the
    gradients and 16-bit gradients are scaled in float32.
    """
    _check_optimizer_lists("adam_step", params, grads, exp_avgs, exp_avg_sqs, low_precision_params, step)
    if not params:
        return
    updates: list[Tensor] | tuple[Tensor, ...] = [g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    if grad_scale != 1.0:
        updates = torch._foreach_mul(updates, grad_scale)  # a float32 gradient is the caller's own tensor
    if weight_decay != 0.0:
        if adamw:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        else:
            updates = torch._foreach_add(updates, params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, updates, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, updates, updates, 1.0 - beta2)
    correction1 = 1.0 - beta1**step if bias_correction else 1.0
    correction2_sqrt = math.sqrt(1.0 - beta2**step) if bias_correction else 1.0
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, correction2_sqrt)
    torch._foreach_add_(denominators, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denominators, -lr / correction1)
    for low, param in zip(low_precision_params, params):
        low.copy_(param)


def lamb_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    low_precision_params: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    bias_correction: bool,
    max_coeff: float,
    min_coeff: float,
    eps_inside_sqrt: bool,
) -> None:
    """One LAMB update of many tensors in place, with DeepSpeed FusedLamb's exact meaning.

    Per tensor: the moments advance as in Adam; ``update = m / (sqrt(v) + eps) +
    weight_decay * param`` (``sqrt(v + eps)`` when ``eps_inside_sqrt``) from the moments
    *without* bias correction; the trust ratio ``||param|| / ||update||`` is clamped to
    ``max_coeff`` and then to at least ``min_coeff`` (1 when either norm is zero); and
    ``param -= step_size * ratio * update`` with ``step_size = lr * sqrt(1 - beta2**step)
    / (1 - beta1**step)`` (``lr`` without bias correction). Recipes tuned on DeepSpeed only
    reproduce with this placement of eps and of the correction. Arithmetic runs in at
    least float32 whatever the storage dtypes; ``low_precision_params`` get the result as
    in :func:`adam_step`.
    """
    _check_optimizer_lists("lamb_step", params, grads, exp_avgs, exp_avg_sqs, low_precision_params, step)
    if not params:
        return
    stored = [*params, *exp_avgs, *exp_avg_sqs]
    computed = [_compute(t) for t in stored]
    count = len(params)
    masters, moments, squares = computed[:count], computed[count:2 * count], computed[2 * count:]
    updates = [g.to(m.dtype) for g, m in zip(grads, moments)]
    torch._foreach_lerp_(moments, updates, 1.0 - beta1)
    torch._foreach_mul_(squares, beta2)
    torch._foreach_addcmul_(squares, updates, updates, 1.0 - beta2)
    if eps_inside_sqrt:
        denominators = torch._foreach_sqrt(torch._foreach_add(squares, eps))
    else:
        denominators = torch._foreach_add(torch._foreach_sqrt(squares), eps)
    updates = torch._foreach_div(moments, denominators)
    if weight_decay != 0.0:
        torch._foreach_add_(updates, masters, alpha=weight_decay)
    weight_norms = torch.stack(torch._foreach_norm(masters))
    update_norms = torch.stack(torch._foreach_norm(updates))
    ratios = (weight_norms / update_norms).clamp(max=max_coeff).clamp(min=min_coeff)
    ratios = torch.where((weight_norms > 0) & (update_norms > 0), ratios, torch.ones_like(ratios))
    step_size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step) if bias_correction else lr
    torch._foreach_mul_(updates, list((ratios * -step_size).unbind()))
    torch._foreach_add_(masters, updates)
    for original, result in zip(stored, computed):
        if result is not original:
            original.copy_(result)
    for low, param in zip(low_precision_params, params):
        low.copy_(param)
