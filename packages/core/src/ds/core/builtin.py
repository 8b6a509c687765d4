"""Core's own components, registered through the same hooks as any plugin.

Registered first, core is called last by pluggy: every plugin can override a default
(``ds_choose_partitioner`` is also ``trylast``), and a name core registers cannot be
registered again by a plugin without an error naming both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ds.core import hookimpl


@hookimpl
def ds_register_config_sections(register: Callable[..., None]) -> None:
    from ds.core.config import CORE_SECTIONS

    for key, model in CORE_SECTIONS.items():
        register(key, model)


@hookimpl
def ds_register_partitioners(register: Callable[..., None]) -> None:
    from ds.core.data_parallel import data_parallel_factory

    register("data_parallel", data_parallel_factory)


@hookimpl(trylast=True)
def ds_choose_partitioner(config: Any) -> str:
    return "data_parallel"


@hookimpl
def ds_register_communicators(register: Callable[..., None]) -> None:
    from ds.core.comm import torch_communicator_factory

    register("torch", torch_communicator_factory)


@hookimpl
def ds_register_optimizers(register: Callable[..., None]) -> None:
    from ds.core.optimizers import register_torch_optimizers

    register_torch_optimizers(register)


@hookimpl
def ds_register_kernel_backends(register: Callable[..., None]) -> None:
    from ds.core.kernels import TorchReferenceBackend

    register(TorchReferenceBackend())


@hookimpl
def ds_register_model_transforms(register: Callable[..., None]) -> None:
    from ds.core.transforms.causal_lm_loss import FusedCrossEntropy
    from ds.core.transforms.compile import CompileBlocks
    from ds.core.transforms.norms import NormKernelInjection

    register(NormKernelInjection())
    register(FusedCrossEntropy())
    register(CompileBlocks())


@hookimpl
def ds_register_commands(register: Callable[..., None]) -> None:
    from ds.core.checkpoint import command as checkpoint_command
    from ds.core.cli import Command
    from ds.core.config import command as config_command

    register("config", Command(help="validate a config file and print it resolved",
                               configure=config_command.configure, run=config_command.run))
    register("checkpoint", Command(help="list checkpoints or export one as a Hugging Face model",
                                   configure=checkpoint_command.configure, run=checkpoint_command.run))
