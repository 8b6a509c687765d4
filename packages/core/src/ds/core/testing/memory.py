"""Peak live tensor-storage bytes of a block of code, measurable on CPU.

GPU memory targets ("stage 2 holds no more than DeepSpeed's ZeRO-2") are checked on the
GPU machine, but the bytes a partitioner keeps alive are the same on every device: a
full-size temporary made on the GPU is made on the CPU too. :class:`StoragePeakTracker`
is a ``TorchDispatchMode`` that sees every tensor an op returns (forward, autograd's
backward and accumulation, optimizer steps, collectives' outputs), counts each
underlying storage once (views share it) from the op that first returns it until the
storage is freed, and keeps the running peak. It counts what ``torch.cuda.max_memory_allocated``
would count minus allocator rounding and communication-library internals, so tests can
assert byte budgets without a GPU.

Storages that exist before the tracker starts are unknown to it; pass them to
:meth:`StoragePeakTracker.track` (or create the model inside the tracker).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class StoragePeakTracker(TorchDispatchMode):
    """Live and peak storage bytes on one device type while active.

    ``with StoragePeakTracker() as tracker: ...`` then read ``tracker.peak_bytes``;
    :meth:`reset_peak` starts a new peak from what is live now (e.g. after a warm-up
    step that creates optimizer state).
    """

    def __init__(self, device_type: str = "cpu") -> None:
        super().__init__()
        self.device_type = device_type
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, int] = {}

    def track(self, *tensors: torch.Tensor) -> None:
        """Count storages created before the tracker started (each once)."""
        for tensor in tensors:
            self._record(tensor)

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._record(leaf)
        return out

    def _record(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != self.device_type:
            return
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        key = storage.data_ptr()
        if nbytes == 0 or key in self._live:
            return
        self._live[key] = nbytes
        # Storages keep their Python object while alive, so this fires when the memory is freed.
        weakref.finalize(storage, self._release, key)
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _release(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key, 0)


__all__ = ["StoragePeakTracker"]
