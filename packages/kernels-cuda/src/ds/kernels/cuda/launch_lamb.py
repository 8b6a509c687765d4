"""Multi-tensor fused LAMB (csrc/lamb.cu): two launches per dtype combination, no host sync.

The kernels read the same cached tensor table as Adam (:mod:`._tensor_tables`) plus a
float32 workspace per table (chunk sums, trust ratios, arrival counters). The kernels
return the workspace's counters to zero, so it is allocated zeroed once and reused by
every later step over the same tensors. A workspace belongs to one stream at a time:
two concurrent steps over the very same tensors would race anyway.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import Tensor

from ._launch import on_device, reference, stream
from ._tensor_tables import DeviceCache, covered, tensor_tables

_workspaces = DeviceCache()


def lamb_step(ext: ModuleType, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
              exp_avg_sqs: list[Tensor], low_precision_params: list[Tensor], *, lr: float, beta1: float,
              beta2: float, eps: float, weight_decay: float, step: int, bias_correction: bool, max_coeff: float,
              min_coeff: float, eps_inside_sqrt: bool) -> None:
    args = (params, grads, exp_avgs, exp_avg_sqs, low_precision_params)
    if not params or step < 1 or len(low_precision_params) not in (0, len(params)) or not covered(*args):
        reference("lamb_step")(*args, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                               step=step, bias_correction=bias_correction, max_coeff=max_coeff,
                               min_coeff=min_coeff, eps_inside_sqrt=eps_inside_sqrt)
        return
    step_size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step) if bias_correction else lr
    device = params[0].device
    with on_device(params[0]):
        s = stream()
        for launch in tensor_tables(ext.ADAM_CHUNK, *args):
            size = ext.lamb_workspace_floats(launch.num_tensors, launch.total_chunks)
            workspace = _workspaces.get(launch.key, lambda size=size: torch.zeros(size, device=device))
            ext.lamb_step(launch.table.data_ptr(), workspace.data_ptr(), launch.num_tensors, launch.total_chunks,
                          launch.param_code, launch.grad_code, launch.copy_code, launch.vectorized, beta1, beta2,
                          eps, weight_decay, step_size, max_coeff, min_coeff, eps_inside_sqrt, s)
