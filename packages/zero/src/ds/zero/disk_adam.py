"""CPU Adam whose moments live on disk between steps: ZeRO-Infinity's optimizer offload.

Each parameter (for ZeRO stages 1 and 2, one flat group's master slice; for stage 3, one
FSDP2 DTensor's local shard) is one sub-group of a :class:`~ds.zero.state_swap.SwappedStates`;
a stage-3 shard a rank holds no elements of has no sub-group and nothing to update.
A step streams the sub-groups through three buffers, so while parameter *i* is updated
the moments of *i+1* are read and those of *i-1* written back; memory holds three parameters' moments, not all of them.
The update itself is :class:`~ds.zero.cpu_adam.CPUAdam`'s, so results equal CPU
offload bit for bit. Only ``step`` (one number per parameter) stays in ``self.state``;
:meth:`DiskStateAdam.moments_in_memory` and :meth:`DiskStateAdam.store_loaded_moments`
move the moments in and out for checkpoints.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ds.core.state_names import local
from ds.zero.cpu_adam import CPUAdam
from ds.zero.host_memory import pin_host_memory
from ds.zero.state_swap import SwappedStates
from ds.zero.swap import SwapConfig

if TYPE_CHECKING:
    from ds.zero.config import OffloadConfig

MOMENTS = ("exp_avg", "exp_avg_sq")


class DiskStateAdam(CPUAdam):
    """CPUAdam over fixed param groups whose ``exp_avg``/``exp_avg_sq`` are files in ``folder``.

    ``folder`` is owned by the optimizer: its files are deleted when it is collected.
    """

    def __init__(self, param_groups: list[dict[str, Any]], *, folder: str | Path, offload: OffloadConfig) -> None:
        super().__init__(param_groups)
        # Only parameters with local elements get a sub-group (an FSDP2 shard may be empty).
        self._params = [p for group in self.param_groups for p in group["params"] if local(p).numel() > 0]
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._swapped = SwappedStates(folder, [local(p).numel() for p in self._params], MOMENTS,
                                      config=SwapConfig(buffer_count=offload.buffer_count,
                                                         pin_memory=pin_host_memory(offload)))
        self._stream: Iterator[tuple[int, dict[str, torch.Tensor]]] | None = None
        weakref.finalize(self, _close_and_remove, self._swapped.close, Path(folder))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        order = [i for i, p in enumerate(self._params) if p.grad is not None]
        stream = self._swapped.stream(order)
        self._stream = stream
        try:
            result = super().step(closure, **kwargs)
            for _ in stream:  # nothing left but the final write-back
                raise AssertionError("CPUAdam visited fewer parameters than have gradients")
        finally:
            self._stream = None
            stream.close()  # type: ignore[attr-defined]
        return result

    def _init_state(self, group: dict[str, Any], param: torch.Tensor, state: dict[str, Any]) -> None:
        """The moments start as zeros on disk (SwappedStates' initial value)."""

    def _update(self, group: dict[str, Any], param: torch.Tensor, state: dict[str, Any],
                copy: torch.Tensor | None, grad_multiplier: float) -> None:
        assert self._stream is not None
        if id(param) not in self._index:  # no local elements
            return
        index, moments = next(self._stream)
        assert index == self._index[id(param)], "CPUAdam visits parameters in param_groups order"
        state.update({name: view.view_as(local(param)) for name, view in moments.items()})
        try:
            super()._update(group, param, state, copy, grad_multiplier)
        finally:
            for name in MOMENTS:
                del state[name]

    @contextmanager
    def moments_in_memory(self) -> Iterator[None]:
        """Read every parameter's moments into ``self.state`` (for a checkpoint) for a while.

        The tensors stay valid after the block ends; ``self.state`` drops them again.
        """
        for index, param in enumerate(self._params):
            if self.state.get(param):
                self.state[param].update({k: v.view_as(local(param)) for k, v in self._swapped.read(index).items()})
        try:
            yield
        finally:
            for state in self.state.values():
                for name in MOMENTS:
                    state.pop(name, None)

    def store_loaded_moments(self) -> None:
        """Write moments a checkpoint load put into ``self.state`` to disk (zeros where none came)."""
        for index, param in enumerate(self._params):
            state = self.state.get(param, {})
            loaded = {name: local(state.pop(name)) for name in MOMENTS if name in state}
            zeros = torch.zeros(local(param).numel())
            self._swapped.write(index, {name: loaded.get(name, zeros).detach().reshape(-1).float()
                                        for name in MOMENTS})


def moments_in_memory(optimizer: torch.optim.Optimizer) -> AbstractContextManager[None]:
    """:meth:`DiskStateAdam.moments_in_memory` for any optimizer (a no-op for the others)."""
    return optimizer.moments_in_memory() if isinstance(optimizer, DiskStateAdam) else nullcontext()


def store_loaded_moments(optimizer: torch.optim.Optimizer) -> None:
    """:meth:`DiskStateAdam.store_loaded_moments` for any optimizer (a no-op for the others)."""
    if isinstance(optimizer, DiskStateAdam):
        optimizer.store_loaded_moments()


def _close_and_remove(close: Callable[[], None], folder: Path) -> None:
    close()
    folder.rmdir()
