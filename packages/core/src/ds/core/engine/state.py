"""Saving and restoring an engine through the universal checkpoint format.

Tensors go through the partitioner (model weights and optimizer state under global
names), plus frozen parameters and persistent buffers (which no partitioner owns) and
each rank's RNG states; everything else (counters, scheduler, loss scaler,
optimizer hyper-parameters, client state) is JSON metadata. Nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ds.core.errors import CheckpointError
from ds.core.state_names import load_untrained_state, untrained_state_shards

if TYPE_CHECKING:
    from ds.core.engine.engine import Engine

FORMAT = "ds-engine/1"


def _rank_prefix(rank: int) -> str:
    return f"rank/{rank:05d}/"


def _rng_shards(rank: int) -> tuple[list[Any], dict[str, Any]]:
    """This rank's generator states as tensors, plus the JSON part (Python's ``random``)."""
    from ds.core.checkpoint import TensorShard, rng_state

    tensors, meta = rng_state()
    prefix = _rank_prefix(rank)
    return [TensorShard(f"{prefix}rng/{k}", tuple(v.shape), v.reshape(-1), 0) for k, v in tensors.items()], meta


def _optimizer_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    groups = []
    for group in optimizer.param_groups:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()
                       if k != "params" and isinstance(v, (int, float, bool, str, tuple, list, type(None)))})
    return groups


def _hugging_face_config(module: torch.nn.Module) -> dict[str, Any] | None:
    """The model's Hugging Face config as ``save_pretrained`` writes it, if it has one.

    Stored so that ``ds checkpoint export`` can write ``config.json`` beside the weights
    and the export loads with ``from_pretrained`` alone. Duck-typed on
    ``PretrainedConfig.to_json_string`` so core never imports ``transformers``.
    """
    to_json = getattr(getattr(module, "config", None), "to_json_string", None)
    return json.loads(to_json(use_diff=False)) if callable(to_json) else None


def save_engine_checkpoint(engine: Engine, directory: Path, tag: str | None, client_state: dict[str, Any]) -> Path:
    from ds.core.checkpoint import save_checkpoint
    from ds.core.checkpoint.export import HF_CONFIG_KEY

    try:
        json.dumps(client_state)
    except TypeError as exc:
        raise CheckpointError(
            f"client_state must be JSON-serialisable (checkpoints never pickle): {exc}. "
            "Convert tensors to lists or save them in your own safetensors file."
        ) from exc
    tag = tag or f"global_step{engine.global_steps}"
    scheduler = engine.lr_scheduler
    metadata = {
        "format": FORMAT,
        "partitioner": engine.partitioner_name,
        "world_size": engine.comm.world_size,
        "dp_size": engine.mesh.dp_size,
        "counters": {
            "global_steps": engine.global_steps,
            "global_samples": engine.global_samples,
            "micro_steps": engine.micro_steps,
            "skipped_steps": engine.skipped_steps,
        },
        "loss_scaler": engine.loss_scaler.state_dict(),
        "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
        "optimizer_param_groups": _optimizer_hyperparameters(engine.optimizer),
        "client_state": client_state,
        "config": engine.config.raw,
        HF_CONFIG_KEY: _hugging_face_config(engine.module),
    }
    rng_shards, rng_meta = _rng_shards(engine.comm.rank)
    return save_checkpoint(
        directory,
        tag,
        shards=engine.partitioner.checkpoint_shards() + untrained_state_shards(engine.module, engine.comm.rank)
        + rng_shards,
        metadata=metadata,
        rank_metadata={"rng": rng_meta},
        rank=engine.comm.rank,
        world_size=engine.comm.world_size,
        barrier=engine.comm.barrier,
    )


def load_engine_checkpoint(engine: Engine, directory: Path, tag: str | None) -> tuple[Path, dict[str, Any]]:
    from ds.core.checkpoint import CheckpointReader, restore_rng_state

    reader = CheckpointReader(directory, tag)
    meta = reader.metadata
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{reader.path} is not a ds engine checkpoint (format {meta.get('format')!r}, expected {FORMAT!r})."
        )
    engine.partitioner.load_checkpoint(reader)
    load_untrained_state(engine.module, reader)
    groups = meta["optimizer_param_groups"]
    if len(groups) == len(engine.optimizer.param_groups):
        for group, saved in zip(engine.optimizer.param_groups, groups, strict=True):
            group.update({k: (tuple(v) if isinstance(group.get(k), tuple) else v) for k, v in saved.items()})
    if engine.lr_scheduler is not None and meta["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    engine.loss_scaler.load_state_dict(meta["loss_scaler"])
    for key, value in meta["counters"].items():
        setattr(engine, key, value)
    # Checkpoints hold no partly accumulated gradients, so training resumes at the start
    # of an accumulation window: counted in this run's window length, which differs from
    # the saved run's when the world size changed under the same global batch.
    engine.micro_steps = engine.global_steps * engine.gradient_accumulation_steps
    prefix = _rank_prefix(engine.comm.rank)
    names = [n for n in reader.names() if n.startswith(prefix + "rng/")]
    if names and meta["world_size"] == engine.comm.world_size:
        tensors = {n[len(prefix + "rng/"):]: reader.read_full(n) for n in names}
        restore_rng_state(tensors, reader.rank_metadata(engine.comm.rank)["rng"])
    return reader.path, meta["client_state"]
