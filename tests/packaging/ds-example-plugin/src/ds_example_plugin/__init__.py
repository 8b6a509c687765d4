"""ds-example-plugin: the smallest complete third-party ds plugin.

A ds plugin is a module with ``@ds.core.hookimpl`` functions named after the hooks in
``ds.core.hookspecs``, advertised in its distribution's metadata under the entry-point
group ``ds.plugins``::

    [project.entry-points."ds.plugins"]
    example = "ds_example_plugin"

After ``pip install``, ds imports it the first time it composes a run, and ``ds report``
lists it. Nothing here runs per training step: the hooks hand ds factories and
backends once, and ds keeps what it chooses.

This plugin adds two things:

* an optimizer, ``ExampleSignSGD``, which a config selects by name::

      "optimizer": {"type": "ExampleSignSGD", "params": {"lr": 0.01}}

* a kernel op, ``example_silu``, declared with its torch reference (the op's meaning,
  which tests compare every backend against), and a backend, ``example-cpu``, that
  runs it on CPU. On any other device ds falls back to the reference and ``ds report``
  says why. Call it as ``torch.ops.ds.example_silu(x)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

import ds.core
from ds.core.kernels import Availability

OP_NAME = "example_silu"


class ExampleSignSGD(torch.optim.Optimizer):
    """Sign descent: every parameter moves by exactly ``lr`` against its gradient's sign.

    No torch optimizer takes this step, so a test can tell from the weights alone that
    the config's ``optimizer.type`` reached this plugin.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.01) -> None:
        if lr <= 0:
            raise ValueError(f"ExampleSignSGD: lr must be positive, got {lr}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.add_(torch.sign(param.grad), alpha=-group["lr"])
        return loss


def silu_reference(x: torch.Tensor) -> torch.Tensor:
    """What ``example_silu`` means: ``x * sigmoid(x)``, in plain torch."""
    return x * torch.sigmoid(x)


class ExampleCpuBackend:
    """Runs ``example_silu`` on CPU with torch's fused SiLU; ranks above core's reference."""

    name = "example-cpu"
    priority = 10

    def ops(self) -> list[str]:
        return [OP_NAME]

    def availability(self, op: str, device_type: str) -> Availability:
        if device_type != "cpu":
            return Availability(False, f"{self.name} runs on CPU only")
        return Availability(True, "torch.nn.functional.silu on CPU")

    def implementation(self, op: str, device_type: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return torch.nn.functional.silu


@ds.core.hookimpl
def ds_register_optimizers(register: Callable[..., None]) -> None:
    register("ExampleSignSGD", ExampleSignSGD)


@ds.core.hookimpl
def ds_define_kernel_ops(define: Callable[..., None]) -> None:
    define(OP_NAME, silu_reference)


@ds.core.hookimpl
def ds_register_kernel_backends(register: Callable[..., None]) -> None:
    register(ExampleCpuBackend())
