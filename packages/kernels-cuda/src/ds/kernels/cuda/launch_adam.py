"""Multi-tensor fused Adam/AdamW (csrc/adam.cu): one launch per dtype combination.

The kernel reads a device table with one row per tensor (addresses, size, first chunk),
built and cached by :mod:`._tensor_tables`.
"""

from __future__ import annotations

from types import ModuleType

from torch import Tensor

from ._launch import on_device, reference, stream
from ._tensor_tables import covered, tensor_tables


def adam_step(ext: ModuleType, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
              exp_avg_sqs: list[Tensor], low_precision_params: list[Tensor], *, lr: float, beta1: float,
              beta2: float, eps: float, weight_decay: float, step: int, adamw: bool, bias_correction: bool,
              grad_scale: float = 1.0) -> None:
    args = (params, grads, exp_avgs, exp_avg_sqs, low_precision_params)
    hyper = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay, "step": step,
             "adamw": adamw, "bias_correction": bias_correction, "grad_scale": grad_scale}
    if not params or step < 1 or len(low_precision_params) not in (0, len(params)) or not covered(*args):
        reference("adam_step")(*args, **hyper)
        return
    correction1 = 1.0 - beta1**step if bias_correction else 1.0
    correction2 = 1.0 - beta2**step if bias_correction else 1.0
    with on_device(params[0]):
        s = stream()
        for launch in tensor_tables(ext.ADAM_CHUNK, *args):
            ext.adam_step(launch.table.data_ptr(), launch.num_tensors, launch.total_chunks, launch.param_code,
                          launch.grad_code, launch.copy_code, launch.vectorized, lr, beta1, beta2, eps, weight_decay,
                          correction1, correction2, grad_scale, adamw, s)
