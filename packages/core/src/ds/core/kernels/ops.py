"""Core's named ops, callable as ``ds.core.kernels.ops.<name>`` or ``torch.ops.ds.<name>``.

    from ds.core.kernels import ops
    y = ops.rms_norm(x, weight, 1e-6)             # differentiable
    ops.adam_step(params, grads, exp_avgs, exp_avg_sqs, [], lr=1e-3, beta1=0.9,
                  beta2=0.999, eps=1e-8, weight_decay=0.01, step=1, adamw=True,
                  bias_correction=True)           # in place, under torch.no_grad()

Each call runs whichever backend was selected for the tensors' device type (see
:mod:`ds.core.kernels.selection`); the references in :mod:`ds.core.kernels.reference`
define what every backend must compute.
"""

from __future__ import annotations

from ds.core.kernels import reference
from ds.core.kernels.registry import define_op

_rms_norm = define_op("rms_norm", reference.rms_norm, backward=reference.rms_norm_backward)
_layer_norm = define_op("layer_norm", reference.layer_norm, backward=reference.layer_norm_backward)
_softmax = define_op("softmax", reference.softmax, backward=reference.softmax_backward, saves="output")
_adam_step = define_op(
    "adam_step", reference.adam_step, mutates_args=("params", "exp_avgs", "exp_avg_sqs", "low_precision_params")
)
_lamb_step = define_op(
    "lamb_step", reference.lamb_step, mutates_args=("params", "exp_avgs", "exp_avg_sqs", "low_precision_params")
)

rms_norm = _rms_norm.custom_op
layer_norm = _layer_norm.custom_op
softmax = _softmax.custom_op
adam_step = _adam_step.custom_op
lamb_step = _lamb_step.custom_op

CORE_OPS: tuple[str, ...] = (
    "rms_norm", "rms_norm_backward", "layer_norm", "layer_norm_backward", "softmax", "softmax_backward", "adam_step",
    "lamb_step",
)

__all__ = ["CORE_OPS", "adam_step", "lamb_step", "layer_norm", "rms_norm", "softmax"]
