"""Universal, atomic checkpoints: safetensors for tensors, JSON for metadata, no pickle.

Saving is collective; each rank passes the slices it holds::

    from ds.core.checkpoint import CheckpointReader, TensorShard, save_checkpoint

    flat = param.detach().reshape(-1)
    shards = [TensorShard("model/linear.weight", tuple(param.shape), flat[lo:hi], lo)]
    save_checkpoint("ckpt", "global_step100", shards=shards, metadata={"step": 100},
                    rank=rank, world_size=world_size, barrier=torch.distributed.barrier)

Loading works under any world size or layout: a rank reads the range it owns::

    with CheckpointReader("ckpt") as reader:          # the tag named by ckpt/latest
        mine = reader.read("model/linear.weight", lo, hi)

See :mod:`ds.core.checkpoint.format` for the layout on disk.
"""

from __future__ import annotations

from ds.core.checkpoint.export import export_consolidated
from ds.core.checkpoint.format import TensorShard
from ds.core.checkpoint.reader import CheckpointReader, list_tags
from ds.core.checkpoint.rng import restore_rng_state, rng_state
from ds.core.checkpoint.writer import save_checkpoint

__all__ = [
    "CheckpointReader",
    "TensorShard",
    "export_consolidated",
    "list_tags",
    "restore_rng_state",
    "rng_state",
    "save_checkpoint",
]
