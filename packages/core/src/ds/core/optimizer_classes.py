"""The optimizer classes core adds to torch's, built by :mod:`ds.core.optimizers` from a config.

* :class:`FusedAdam` and :class:`FusedLamb` step every parameter of a group through one call
  of the ds ops ``torch.ops.ds.adam_step`` / ``torch.ops.ds.lamb_step``: with
  ds-kernels-cuda installed and the parameters on its GPU that is one multi-tensor kernel
  launch (two for LAMB) per step and dtype combination, elsewhere the ops' torch reference.
  Their state dicts use torch's keys (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints
  move between them and ``torch.optim.Adam``/``AdamW``.
* :class:`AdamWithoutBiasCorrection`: torch's Adam always corrects the moments; recipes
  tuned on DeepSpeed's FusedAdam with ``bias_correction: false`` only reproduce without it.
  It is the CPU (and amsgrad) path of that setting.

Moments are kept in at least float32 whatever the parameter dtype, as the fused kernels
need; parameters that are DTensors (FSDP2 shards) are updated through their local tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ds.core.kernels import ops
from ds.core.state_names import local

Closure = Callable[[], float] | None


def _check_hyper(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"betas must lie in [0, 1), got {betas}")


def _run_closure(closure: Closure) -> float | None:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class AdamWithoutBiasCorrection(Optimizer):
    """Adam that does not divide the moments by ``1 - beta**t`` (``bias_correction: false``).

    ``decoupled_weight_decay`` picks AdamW's decay (``p -= lr * wd * p``) over L2
    regularisation (``grad += wd * p``), as DeepSpeed's ``adam_w_mode`` does.
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        amsgrad: bool,
        decoupled_weight_decay: bool,
    ) -> None:
        _check_hyper(lr, betas, eps, weight_decay)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "amsgrad": amsgrad, "decoupled_weight_decay": decoupled_weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Closure = None) -> float | None:  # type: ignore[override]
        loss = _run_closure(closure)
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                if decay:
                    if group["decoupled_weight_decay"]:
                        param.mul_(1 - lr * decay)
                    else:
                        grad = grad.add(param, alpha=decay)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
                    denom = state["max_exp_avg_sq"].sqrt().add_(eps)
                else:
                    denom = exp_avg_sq.sqrt().add_(eps)
                param.addcdiv_(exp_avg, denom, value=-lr)
        return loss


class _MultiTensorOptimizer(Optimizer):
    """Collects a group's parameters, gradients and moments into the lists a ds op takes.

    Parameters that have taken different numbers of steps (one added late, or skipped when
    its gradient was None) are stepped in separate calls, one per step count; usually
    there is one. ``step`` stays a CPU tensor as in torch, so reading it never syncs a GPU.

    ``step``'s keyword arguments let a ZeRO partitioner fuse its step: ``gradients`` (one
    per parameter, in ``param_groups`` order, None to skip one) replace ``param.grad``,
    since a bf16 gradient slice cannot be an fp32 master's ``.grad`` and converting it would
    cost a pass and an fp32 copy; ``low_precision_copies`` receive each updated parameter
    (the compute-dtype weights) in the same pass; ``grad_scale`` multiplies every gradient
    as it is read.
    """

    def _apply(self, group: dict[str, Any], step: int, tensors: tuple[list[Tensor], ...], grad_scale: float) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Closure = None,
        *,
        gradients: Sequence[Tensor | None] | None = None,
        low_precision_copies: Sequence[Tensor] | None = None,
        grad_scale: float = 1.0,
    ) -> float | None:
        loss = _run_closure(closure)
        index = 0
        for group in self.param_groups:
            by_step: dict[int, tuple[list[Tensor], ...]] = {}
            for param in group["params"]:
                grad = param.grad if gradients is None else gradients[index]
                copy = None if low_precision_copies is None else low_precision_copies[index]
                index += 1
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[param]
                if not state:
                    moments_dtype = torch.promote_types(param.dtype, torch.float32)
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, dtype=moments_dtype,
                                                        memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
                state["step"] += 1
                lists = by_step.setdefault(int(state["step"]), ([], [], [], [], []))
                for target, tensor in zip(lists, (param, grad, state["exp_avg"], state["exp_avg_sq"], copy)):
                    if tensor is not None:
                        target.append(local(tensor))
            for step, tensors in by_step.items():
                self._apply(group, step, tensors, grad_scale)
        return loss


class FusedAdam(_MultiTensorOptimizer):
    """Adam/AdamW over ``torch.ops.ds.adam_step``; ``bias_correction`` and decay placement as DeepSpeed's."""

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        bias_correction: bool,
        decoupled_weight_decay: bool,
    ) -> None:
        _check_hyper(lr, betas, eps, weight_decay)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "bias_correction": bias_correction, "decoupled_weight_decay": decoupled_weight_decay}
        super().__init__(params, defaults)

    def _apply(self, group: dict[str, Any], step: int, tensors: tuple[list[Tensor], ...], grad_scale: float) -> None:
        beta1, beta2 = group["betas"]
        ops.adam_step(*tensors, lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                      eps=float(group["eps"]), weight_decay=float(group["weight_decay"]), step=step,
                      adamw=bool(group["decoupled_weight_decay"]), bias_correction=bool(group["bias_correction"]),
                      grad_scale=grad_scale)


class FusedLamb(_MultiTensorOptimizer):
    """LAMB over ``torch.ops.ds.lamb_step`` with DeepSpeed FusedLamb's meaning (see the op's reference).

    The trust ratio of each tensor is clamped to ``[min_coeff, max_coeff]``; unlike
    DeepSpeed it is not read back to the host each step (that would cost a GPU sync).
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        bias_correction: bool,
        max_coeff: float,
        min_coeff: float,
        eps_inside_sqrt: bool,
    ) -> None:
        _check_hyper(lr, betas, eps, weight_decay)
        if not 0.0 <= min_coeff <= max_coeff:
            raise ValueError(f"need 0 <= min_coeff <= max_coeff, got min_coeff={min_coeff}, max_coeff={max_coeff}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "bias_correction": bias_correction, "max_coeff": max_coeff, "min_coeff": min_coeff,
                    "eps_inside_sqrt": eps_inside_sqrt}
        super().__init__(params, defaults)

    def _apply(self, group: dict[str, Any], step: int, tensors: tuple[list[Tensor], ...], grad_scale: float) -> None:
        beta1, beta2 = group["betas"]
        params, grads, exp_avgs, exp_avg_sqs, copies = tensors
        if grad_scale != 1.0:  # the LAMB op reads gradients as they are
            grads = list(torch._foreach_mul(grads, grad_scale))
        ops.lamb_step(params, grads, exp_avgs, exp_avg_sqs, copies, lr=float(group["lr"]), beta1=float(beta1),
                      beta2=float(beta2), eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                      step=step, bias_correction=bool(group["bias_correction"]), max_coeff=float(group["max_coeff"]),
                      min_coeff=float(group["min_coeff"]), eps_inside_sqrt=bool(group["eps_inside_sqrt"]))


__all__ = ["AdamWithoutBiasCorrection", "FusedAdam", "FusedLamb"]
