"""``ds.core.initialize``: compose a training run from a model and a config.

The order is fixed and documented so plugins can rely on it:

1. load and validate the config (plugins' sections and cross-checks included);
2. start the communicator and build the mesh (dp x pp x tp x sp x ep);
3. apply model transforms in ascending ``order`` (tensor, sequence, expert parallel,
   pipeline split, compression, kernel injection);
4. let the chosen partitioner take the model: master weights, gradient sync, optimizer;
5. build the LR scheduler over the partitioner's optimizer and the engine around it all;
6. build a distributed data loader if training data was given.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ds.core.engine.engine import Engine
from ds.core.errors import ConfigError
from ds.core.partition import PartitionContext, PrecisionPolicy
from ds.core.plugins import Components, default_components

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _show_training_log(rank: int) -> None:
    """Make the ``ds`` logger's INFO lines visible on rank 0 unless the user configured logging."""
    logger = logging.getLogger("ds")
    if rank == 0 and not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[ds] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def precision_policy(config: Any) -> PrecisionPolicy:
    """Compute dtype from fp16/bf16, fp32 masters, reduction dtype from communication_data_type.

    Unset, the reduction runs in the compute dtype, which is DeepSpeed's meaning of the key:
    a DeepSpeed config moved here communicates (and accumulates ZeRO gradients) in as many
    bytes as it did there. ``"communication_data_type": "fp32"`` buys fp32 sums at twice the
    gradient traffic and memory.
    """
    if config.fp16.enabled and config.bf16.enabled:
        raise ConfigError("fp16.enabled and bf16.enabled are both true; enable at most one.")
    param_dtype = torch.float16 if config.fp16.enabled else torch.bfloat16 if config.bf16.enabled else torch.float32
    reduce_name = config.communication_data_type
    reduce_dtype = _DTYPES[reduce_name] if reduce_name else param_dtype
    return PrecisionPolicy(param_dtype=param_dtype, master_dtype=torch.float32, reduce_dtype=reduce_dtype)


def _optimizer_factory(
    optimizer: Any, config: Any, components: Components
) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer]:
    if isinstance(optimizer, torch.optim.Optimizer):
        # Rebuild the same optimizer class over the partitioner's master weights.
        cls, defaults = type(optimizer), dict(optimizer.defaults)
        return lambda groups: cls(groups, **defaults)
    if callable(optimizer):
        return optimizer
    if config.optimizer is not None:
        from ds.core.optimizers import build_optimizer

        return lambda groups: build_optimizer(config.optimizer, groups, components)
    raise ConfigError(
        "no optimizer: set \"optimizer\": {\"type\": ..., \"params\": {...}} in the config, "
        "or pass optimizer= to ds.core.initialize."
    )


def _param_groups(model_parameters: Any, optimizer: Any) -> list[dict[str, Any]] | None:
    if isinstance(optimizer, torch.optim.Optimizer):
        return [{k: v for k, v in g.items()} for g in optimizer.param_groups]
    if model_parameters is None:
        return None
    items = list(model_parameters)
    if items and isinstance(items[0], dict):
        return [dict(g, params=list(g["params"])) for g in items]
    return [{"params": [p for p in items if isinstance(p, torch.Tensor)]}]


def _scheduler(lr_scheduler: Any, optimizer: torch.optim.Optimizer, config: Any) -> Any:
    if lr_scheduler is not None:
        return lr_scheduler(optimizer) if callable(lr_scheduler) and not hasattr(lr_scheduler, "step") else lr_scheduler
    if config.scheduler is not None:
        from ds.core.schedulers import build_scheduler

        return build_scheduler(config.scheduler, optimizer)
    return None


def _dataloader(training_data: Dataset[Any] | None, collate_fn: Any, config: Any, mesh: Any) -> DataLoader[Any] | None:
    if training_data is None:
        return None
    sampler = DistributedSampler(
        training_data,
        num_replicas=mesh.dp_size,
        rank=mesh.rank("dp"),
        shuffle=True,
        seed=config.seed or 0,
        drop_last=config.dataloader_drop_last,
    )
    return DataLoader(
        training_data,
        batch_size=config.train_micro_batch_size_per_gpu,
        sampler=sampler,
        collate_fn=collate_fn,
        drop_last=config.dataloader_drop_last,
    )


def initialize(
    model: nn.Module | None = None,
    config: Any = None,
    optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None = None,
    model_parameters: Iterable[Any] | None = None,
    lr_scheduler: Any = None,
    training_data: Dataset[Any] | None = None,
    collate_fn: Callable[..., Any] | None = None,
    *,
    config_params: Any = None,
    components: Components | None = None,
) -> tuple[Engine, torch.optim.Optimizer, DataLoader[Any] | None, Any]:
    """Build an engine; returns ``(engine, optimizer, dataloader, lr_scheduler)`` like DeepSpeed.

    ``config`` is a path to JSON or YAML, a JSON string, a dict or a loaded config
    (``config_params`` is DeepSpeed's older name for it). ``optimizer`` may be a torch
    optimizer (rebuilt over master weights with the same class, groups and defaults), a
    callable taking param groups, or None to use the config's ``optimizer`` section.
    ``lr_scheduler`` may be a scheduler or a callable taking the optimizer.
    """
    from ds.core.config import load_config
    from ds.core.kernels import install_kernels
    from ds.core.mesh import Mesh

    if model is None:
        raise ConfigError("ds.core.initialize needs model=<torch.nn.Module>.")
    if config is None:
        config = config_params
    if config is None:
        raise ConfigError("ds.core.initialize needs config= (a path, a dict or a JSON string).")
    components = components or default_components()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_config(config, world_size=world_size, model=model, components=components)
    comm_factory = components.communicators.get(cfg.communicator.backend)
    comm = comm_factory(cfg.communicator)
    mesh = Mesh.build(comm, pp=cfg.mesh.pp, tp=cfg.mesh.tp, sp=cfg.mesh.sp, ep=cfg.mesh.ep)
    _show_training_log(comm.rank)
    install_kernels(components)

    precision = precision_policy(cfg)
    context = PartitionContext(
        module=model,
        config=cfg,
        mesh=mesh,
        comm=comm,
        precision=precision,
        make_optimizer=_optimizer_factory(optimizer, cfg, components),
        device=comm.device,
        param_groups=_param_groups(model_parameters, optimizer),
    )
    transforms = sorted((r.value for r in components.model_transforms), key=lambda t: t.order)
    for transform in transforms:
        if transform.applies(cfg):
            context.module = transform.apply(context.module, context)

    name = components.hook.ds_choose_partitioner(config=cfg)
    partitioner = components.partitioners.get(name)(context)
    scheduler = _scheduler(lr_scheduler, partitioner.optimizer, cfg)
    engine = Engine(
        config=cfg,
        comm=comm,
        mesh=mesh,
        partitioner=partitioner,
        precision=precision,
        lr_scheduler=scheduler,
        partitioner_name=name,
    )
    loader = _dataloader(training_data, collate_fn, cfg, mesh)
    return engine, partitioner.optimizer, loader, scheduler
