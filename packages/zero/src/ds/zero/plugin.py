"""ds-zero's plugin: what the ``zero`` entry point of ``ds.plugins`` registers.

Optimizers, by the names a config's ``optimizer.type`` uses (case-insensitive):

* ``CPUAdam`` (aliases ``DeepSpeedCPUAdam``, ``cpu_adam``): Adam/AdamW on CPU, taking
  DeepSpeed's parameters ``lr``, ``betas``, ``eps``, ``weight_decay``,
  ``bias_correction``, ``adamw_mode``, ``amsgrad`` (false only) and
  ``fp32_optimizer_states`` (true only);
* ``CPUAdagrad``: Adagrad on CPU (``lr``, ``lr_decay``, ``eps``, ``weight_decay``,
  ``initial_accumulator_value``, ``amsgrad`` false only).

``ds report`` gets one line saying which instruction-set path CPU Adam runs and why.
"""

from __future__ import annotations

from collections.abc import Callable

from ds.core import hookimpl
from ds.core.errors import ConfigError
from ds.core.optimizers import Params, validated_params
from ds.zero import _native
from ds.zero.cpu_adam import CPUAdagrad, CPUAdam


@validated_params("optimizer 'CPUAdam'")
def build_cpu_adam(
    params: Params,
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    bias_correction: bool = True,
    adamw_mode: bool = True,
    amsgrad: bool = False,
    fp32_optimizer_states: bool = True,
) -> CPUAdam:
    """CPUAdam from DeepSpeed's DeepSpeedCPUAdam parameters."""
    if amsgrad:
        raise ConfigError("optimizer.params.amsgrad=true is not supported by CPUAdam; set it "
                          "to false.")
    if not fp32_optimizer_states:
        raise ConfigError("optimizer.params.fp32_optimizer_states=false is not supported by "
                          "CPUAdam (states are always fp32); remove it.")
    return CPUAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                   adamw_mode=adamw_mode, bias_correction=bias_correction)


@validated_params("optimizer 'CPUAdagrad'")
def build_cpu_adagrad(
    params: Params,
    *,
    lr: float = 1e-2,
    lr_decay: float = 0.0,
    eps: float = 1e-10,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    amsgrad: bool = False,
) -> CPUAdagrad:
    """CPUAdagrad from DeepSpeed's DeepSpeedCPUAdagrad parameters (plus torch's)."""
    if amsgrad:
        raise ConfigError("optimizer.params.amsgrad=true is not supported by CPUAdagrad; "
                          "set it to false.")
    return CPUAdagrad(params, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                      initial_accumulator_value=initial_accumulator_value, eps=eps)


@hookimpl
def ds_register_optimizers(register: Callable[..., None]) -> None:
    register("CPUAdam", build_cpu_adam, aliases=("DeepSpeedCPUAdam", "cpu_adam"))
    register("CPUAdagrad", build_cpu_adagrad)


@hookimpl
def ds_report_lines() -> list[str]:
    from ds.zero import aio

    return [_native.describe(), aio.describe()]


# The ZeRO stages: the ``zero_optimization`` section, the partitioners and the choice.
from ds.zero.partitioners import (  # noqa: E402
    ds_choose_partitioner,
    ds_register_config_sections,
    ds_register_model_transforms,
    ds_register_partitioners,
)

__all__ = [
    "ds_choose_partitioner",
    "ds_register_config_sections",
    "ds_register_model_transforms",
    "ds_register_partitioners",
]
