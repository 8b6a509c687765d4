"""CPU Adam, AdamW and Adagrad: torch optimizers whose update runs in ds-zero's native loops.

These are the optimizers of ZeRO-Offload. The fp32 master weights, their gradients and
the optimizer state live in CPU memory; each step streams them once through AVX-512,
AVX2 or scalar loops (picked by CPUID, threaded with OpenMP) and, in the same pass,
writes the bf16 or fp16 copy of the updated weights that the accelerator computes with::

    optimizer = CPUAdam(master_params, lr=1e-4, weight_decay=0.01)   # AdamW by default
    ...
    optimizer.step(low_precision_params=pinned_bf16_copies)  # then copy those to the GPU

``low_precision_params`` lists one bf16/fp16 tensor (or None) per parameter, in the
order of ``param_groups``. ``grad_multiplier`` folds 1/loss-scale and gradient clipping
into the update instead of spending a pass over the gradients. Gradients may be fp32,
bf16 or fp16.

State dicts use torch's keys (``step``, ``exp_avg``, ``exp_avg_sq``; Adagrad's ``sum``),
and Adam's param groups carry torch's ``decoupled_weight_decay``, so a checkpoint moves
between these classes and ``torch.optim.Adam``/``AdamW``/``Adagrad`` in both directions.

Parameters may be DTensors whose local shard is such a CPU tensor (ZeRO stage 3 with
offload): the update runs on each rank's local shard, and the state is DTensors alike.

Without the native extension the same update runs in torch ops after one warning
(see :mod:`ds.zero._native`); ``optimizer.isa`` says which path runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, overload

import torch

from ds.core.errors import ConfigError
from ds.core.state_names import local
from ds.zero._native import resolve_isa
from ds.zero.cpu_optim_ops import AdamScalars, adagrad_update_, adam_update_

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


class _CPUOptimizer(torch.optim.Optimizer):
    """The step loop both optimizers share: closure, copy pairing, state and step counting."""

    isa: str
    """The instruction-set path every step runs: ``avx512``, ``avx2``, ``scalar`` or ``torch``."""

    def __init__(self, params: ParamsT, defaults: dict[str, Any], isa: str | None) -> None:
        super().__init__(params, defaults)
        self.isa = resolve_isa(isa)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            for param in group["params"]:
                param_state = self.state.get(param, {})
                if "step" in param_state and not torch.is_tensor(param_state["step"]):
                    param_state["step"] = torch.tensor(float(param_state["step"]))

    @overload
    def step(self, closure: None = None, *,
             low_precision_params: Sequence[torch.Tensor | None] | None = None,
             grad_multiplier: float = 1.0, after_update: Callable[[int], None] | None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float], *,
             low_precision_params: Sequence[torch.Tensor | None] | None = None,
             grad_multiplier: float = 1.0, after_update: Callable[[int], None] | None = None) -> float: ...

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], float] | None = None,
        *,
        low_precision_params: Sequence[torch.Tensor | None] | None = None,
        grad_multiplier: float = 1.0,
        after_update: Callable[[int], None] | None = None,
    ) -> float | None:
        """Update every parameter that has a gradient.

        ``low_precision_params``: one bf16/fp16 tensor or None per parameter, in
        ``param_groups`` order, each receiving the updated parameter in the same pass.
        ``grad_multiplier``: every gradient is multiplied by it first.
        ``after_update``: called with a parameter's index (in that order) once it is
        updated, so a caller can start copying it out while the next one is computed.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        count = sum(len(group["params"]) for group in self.param_groups)
        if low_precision_params is not None and len(low_precision_params) != count:
            raise ConfigError(
                f"low_precision_params has {len(low_precision_params)} entries but the "
                f"optimizer has {count} parameters; pass one tensor (or None) per parameter "
                "in param_groups order."
            )
        for group in self.param_groups:
            self._check_group(group)
        pairs = [(group, param) for group in self.param_groups for param in group["params"]]
        for index, (group, param) in enumerate(pairs):
            if param.grad is None:
                continue
            state = self.state[param]
            if not state:
                state["step"] = torch.tensor(0.0)
                self._init_state(group, param, state)
            state["step"] += 1
            copy = low_precision_params[index] if low_precision_params is not None else None
            self._update(group, param, state, copy, grad_multiplier)
            if after_update is not None:
                after_update(index)
        return loss

    def _check_group(self, group: dict[str, Any]) -> None:
        unsupported = [key for key in ("amsgrad", "maximize") if group.get(key)]
        if unsupported:
            raise ConfigError(
                f"{type(self).__name__} does not implement {' and '.join(unsupported)}; the "
                "loaded state dict or param group sets it. Set it to False, or use the torch "
                "optimizer for this run."
            )

    def _init_state(self, group: dict[str, Any], param: torch.Tensor,
                    state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _update(self, group: dict[str, Any], param: torch.Tensor, state: dict[str, Any],
                copy: torch.Tensor | None, grad_multiplier: float) -> None:
        raise NotImplementedError


def _check_hyperparameters(**values: float) -> None:
    for name, value in values.items():
        if not value >= 0.0:
            raise ConfigError(f"optimizer {name} must be >= 0, got {value}")


class CPUAdam(_CPUOptimizer):
    """Adam (``adamw_mode=False``: L2 weight decay) or AdamW (default: decoupled) on CPU.

    The parameters must be fp32 CPU tensors, contiguous. ``bias_correction=False`` drops
    Adam's bias correction, as DeepSpeed's option does. ``isa`` forces an instruction-set
    path (``avx512``, ``avx2``, ``scalar``, ``torch``); by default the best one runs.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        adamw_mode: bool = True,
        bias_correction: bool = True,
        isa: str | None = None,
    ) -> None:
        _check_hyperparameters(lr=lr, eps=eps, weight_decay=weight_decay)
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ConfigError(f"optimizer betas must lie in [0, 1), got {tuple(betas)}")
        defaults = {
            "lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
            "decoupled_weight_decay": adamw_mode, "bias_correction": bias_correction,
        }
        super().__init__(params, defaults, isa)

    def _init_state(self, group: dict[str, Any], param: torch.Tensor,
                    state: dict[str, Any]) -> None:
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.contiguous_format)

    def _update(self, group: dict[str, Any], param: torch.Tensor, state: dict[str, Any],
                copy: torch.Tensor | None, grad_multiplier: float) -> None:
        scalars = AdamScalars.for_step(
            step=int(state["step"].item()), lr=group["lr"], betas=group["betas"],
            eps=group["eps"], weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            bias_correction=group["bias_correction"],
        )
        adam_update_(local(param), local(param.grad), local(state["exp_avg"]), local(state["exp_avg_sq"]),
                     scalars, isa=self.isa, grad_multiplier=grad_multiplier, low_precision_param=copy)


class CPUAdagrad(_CPUOptimizer):
    """Adagrad on CPU with torch's formula and defaults (``lr_decay``, L2 ``weight_decay``)."""

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        *,
        isa: str | None = None,
    ) -> None:
        _check_hyperparameters(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                               initial_accumulator_value=initial_accumulator_value)
        defaults = {
            "lr": lr, "lr_decay": lr_decay, "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value, "eps": eps,
        }
        super().__init__(params, defaults, isa)

    def _init_state(self, group: dict[str, Any], param: torch.Tensor,
                    state: dict[str, Any]) -> None:
        state["sum"] = torch.full_like(param, group["initial_accumulator_value"],
                                       memory_format=torch.contiguous_format)

    def _update(self, group: dict[str, Any], param: torch.Tensor, state: dict[str, Any],
                copy: torch.Tensor | None, grad_multiplier: float) -> None:
        adagrad_update_(
            local(param), local(param.grad), local(state["sum"]), step=int(state["step"].item()), lr=group["lr"],
            lr_decay=group["lr_decay"], weight_decay=group["weight_decay"], eps=group["eps"],
            isa=self.isa, grad_multiplier=grad_multiplier, low_precision_param=copy,
        )
