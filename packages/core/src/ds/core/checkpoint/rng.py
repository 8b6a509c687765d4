"""Capture and restore every global random generator, so a resumed run draws what it would have.

The state is split the way checkpoints store things: byte states as uint8 tensors (saved
as safetensors shards, e.g. ``rank/00001/rng/torch_cpu``) and the small scalars as JSON
(saved as rank metadata). Python's ``random`` state is a tuple of 625 ints and fits JSON.
RNG states differ per rank, so each rank saves and restores its own.
"""

from __future__ import annotations

import random
from typing import Any, cast

import numpy as np
import torch

from ds.core.errors import CheckpointError

_TORCH_CPU = "torch_cpu"
_NUMPY_KEYS = "numpy"
_CUDA_PREFIX = "torch_cuda/"


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """States of Python ``random``, numpy's global generator, torch CPU and every CUDA device.

    Returns ``(tensors, meta)``: uint8 tensors by name, and a JSON-serialisable dict.
    """
    tensors = {_TORCH_CPU: torch.get_rng_state()}
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device, state in enumerate(torch.cuda.get_rng_state_all() if cuda_devices else []):
        tensors[f"{_CUDA_PREFIX}{device}"] = state
    numpy_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    kind, keys, pos, has_gauss, cached_gaussian = numpy_state
    tensors[_NUMPY_KEYS] = torch.from_numpy(keys.astype("<u4").view(np.uint8).copy())
    version, internal, gauss_next = random.getstate()
    meta = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind,
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "cuda_devices": cuda_devices,
    }
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` captured.

    CUDA states are restored for the devices present now; a run resumed on fewer (or no)
    GPUs keeps the saved states of the devices it has.
    """
    missing = sorted({_TORCH_CPU, _NUMPY_KEYS} - tensors.keys()) + sorted({"python", "numpy"} - meta.keys())
    if missing:
        raise CheckpointError(f"RNG state lacks {missing}; pass both halves of what rng_state() returned")
    python = meta["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    numpy = meta["numpy"]
    keys = tensors[_NUMPY_KEYS].numpy().view("<u4").astype(np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(tensors[_TORCH_CPU].to(torch.uint8).cpu())
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device in range(min(int(meta.get("cuda_devices", 0)), available)):
        torch.cuda.set_rng_state(tensors[f"{_CUDA_PREFIX}{device}"].cpu(), device)
