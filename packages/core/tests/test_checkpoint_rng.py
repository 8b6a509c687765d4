"""RNG states survive a checkpoint: a resumed run draws exactly what the original drew."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ds.core.checkpoint import CheckpointReader, TensorShard, restore_rng_state, rng_state, save_checkpoint
from ds.core.errors import CheckpointError


def draw() -> list[float]:
    """Draws from every generator, including the cached-Gaussian halves of Python and numpy."""
    return [
        random.random(),
        random.gauss(0.0, 1.0),
        *np.random.rand(3).tolist(),
        float(np.random.standard_normal()),
        *torch.rand(3).tolist(),
        *torch.randint(0, 2**31, (2,)).tolist(),
    ]


def test_restored_state_reproduces_the_same_draws_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draw()  # leave Python and numpy with a cached Gaussian, the subtle part of their state
    tensors, meta = rng_state()
    shards = [TensorShard.full(f"rank/00000/rng/{key}", tensor) for key, tensor in tensors.items()]
    save_checkpoint(
        tmp_path,
        "rng",
        shards=shards,
        metadata={},
        rank_metadata={"rng": meta},
        rank=0,
        world_size=1,
        barrier=lambda: None,
    )
    expected = draw()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert draw() != expected

    with CheckpointReader(tmp_path) as reader:
        prefix = "rank/00000/rng/"
        loaded = {name[len(prefix) :]: reader.read_full(name) for name in reader.names() if name.startswith(prefix)}
        restore_rng_state(loaded, reader.rank_metadata(0)["rng"])

    assert draw() == expected
    assert all(t.dtype == torch.uint8 for t in tensors.values())
    assert json.loads(json.dumps(meta)) == meta


def test_restoring_half_a_state_is_a_clear_error() -> None:
    tensors, meta = rng_state()

    with pytest.raises(CheckpointError, match=r"RNG state lacks \['python'\]"):
        restore_rng_state(tensors, {"numpy": meta["numpy"]})
