"""What every schedule shares: the closed-form base class and per-param-group values.

Split from the schedules themselves so that each family module (warmup, cycle) and the
registry in ``ds.core.schedulers`` import one small contract.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Annotated, Any

import torch
from pydantic import Field
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ds.core.errors import CheckpointError, ConfigError

NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(gt=0)]
LastBatchIteration = Annotated[int, Field(ge=-1)]
PerGroup = float | list[float]
"""One value for every param group, or one per group (DeepSpeed allows both)."""


def per_group(owner: str, optimizer: Optimizer, value: PerGroup, name: str) -> list[float]:
    groups = len(optimizer.param_groups)
    if isinstance(value, list):
        if len(value) != groups:
            raise ConfigError(f"scheduler {owner!r}: {name} has {len(value)} values for {groups} param groups; "
                              "give one value, or one per group.")
        return list(value)
    return [value] * groups


class StepSchedule(LRScheduler):
    """A schedule whose learning rates are a closed-form function of the step count.

    Subclasses set their attributes, then call ``super().__init__(optimizer,
    last_batch_iteration)``, which applies the rates for the starting step to the
    optimizer (step 0 unless resuming part-way, torch's convention).
    """

    def __init__(self, optimizer: Optimizer, last_batch_iteration: int = -1) -> None:
        super().__init__(optimizer)
        if last_batch_iteration >= 0:
            self.last_epoch = last_batch_iteration + 1
            self._apply(self.last_epoch)

    @abstractmethod
    def lrs_at(self, step: int) -> list[float]:
        """Learning rate of every param group after ``step`` calls of :meth:`step`."""

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return self.lrs_at(self.last_epoch)

    _get_closed_form_lr = get_lr

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": int(self.last_epoch)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        step = state_dict.get("last_epoch") if isinstance(state_dict, dict) else None
        if not isinstance(step, int) or step < 0:
            raise CheckpointError(
                f"{type(self).__name__}: scheduler state must be {{'last_epoch': <int >= 0>}}, got {state_dict!r}."
            )
        self.last_epoch = step
        self._apply(step)

    def _apply(self, step: int) -> None:
        """Set the optimizer's rates for ``step`` directly (used when resuming)."""
        for group, lr in zip(self.optimizer.param_groups, self.lrs_at(step), strict=True):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [float(group["lr"]) for group in self.optimizer.param_groups]
