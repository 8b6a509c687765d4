"""The warmup family: WarmupLR, WarmupDecayLR and WarmupCosineLR.

All three share DeepSpeed's warmup curve (log or linear over ``warmup_num_steps``) and
differ only in what follows it: hold, linear decay, or cosine decay.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field
from torch.optim import Optimizer

from ds.core.errors import ConfigError
from ds.core.optimizers import validated_params
from ds.core.schedulers._base import (
    LastBatchIteration,
    NonNegativeInt,
    PerGroup,
    PositiveInt,
    StepSchedule,
    per_group,
)

WarmupType = Literal["log", "linear"]


def _warmup_fraction(i: int, warmup_steps: int, warmup_type: WarmupType) -> float:
    """DeepSpeed's warmup curve at iteration ``i < warmup_steps``: log(i+1)/log(W) or i/W."""
    if warmup_type == "log":
        return math.log(i + 1) / math.log(warmup_steps)
    return i / warmup_steps


def _check_total_steps(owner: str, total_num_steps: int, warmup_num_steps: int) -> None:
    if total_num_steps < warmup_num_steps:
        raise ConfigError(f"scheduler {owner!r}: total_num_steps ({total_num_steps}) is smaller than "
                          f"warmup_num_steps ({warmup_num_steps}), so the decay would never run. "
                          "Raise total_num_steps.")


class WarmupLR(StepSchedule):
    """Warm up from ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps``, then hold.

    ``lr = min + (max - min) * gamma(i)`` with ``gamma = log(i + 1) / log(W)`` ("log") or
    ``i / W`` ("linear") while ``i < W``, and 1 after; ``W = max(2, warmup_num_steps)``.
    ``warmup_max_lr`` defaults to each param group's configured lr.
    """

    @validated_params("scheduler 'WarmupLR'")
    def __init__(
        self,
        optimizer: Optimizer,
        *,
        warmup_min_lr: PerGroup = 0.0,
        warmup_max_lr: PerGroup | None = None,
        warmup_num_steps: NonNegativeInt = 1000,
        warmup_type: WarmupType = "log",
        last_batch_iteration: LastBatchIteration = -1,
    ) -> None:
        self._init_warmup(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type)
        super().__init__(optimizer, last_batch_iteration)

    def _init_warmup(self, optimizer: Optimizer, min_lr: PerGroup, max_lr: PerGroup | None,
                     warmup_num_steps: int, warmup_type: WarmupType) -> None:
        if max_lr is None:
            max_lr = [float(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]
        owner = type(self).__name__
        self.min_lrs = per_group(owner, optimizer, min_lr, "warmup_min_lr")
        self.max_lrs = per_group(owner, optimizer, max_lr, "warmup_max_lr")
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.warmup_type = warmup_type

    def gamma(self, i: int) -> float:
        """Fraction of the way from min to max lr at DeepSpeed iteration ``i``."""
        if i < self.warmup_num_steps:
            return _warmup_fraction(i, self.warmup_num_steps, self.warmup_type)
        return 1.0

    def lrs_at(self, step: int) -> list[float]:
        gamma = self.gamma(max(step - 1, 0))
        return [low + (high - low) * gamma for low, high in zip(self.min_lrs, self.max_lrs, strict=True)]


class WarmupDecayLR(WarmupLR):
    """:class:`WarmupLR`, then linear decay back to ``warmup_min_lr`` at ``total_num_steps``.

    After warmup ``gamma(i) = max(0, (T - i) / max(1, T - W))``: the rate reaches
    ``warmup_min_lr`` at ``i = total_num_steps`` and stays there.
    """

    @validated_params("scheduler 'WarmupDecayLR'")
    def __init__(
        self,
        optimizer: Optimizer,
        *,
        total_num_steps: PositiveInt,
        warmup_min_lr: PerGroup = 0.0,
        warmup_max_lr: PerGroup | None = None,
        warmup_num_steps: NonNegativeInt = 1000,
        warmup_type: WarmupType = "log",
        last_batch_iteration: LastBatchIteration = -1,
    ) -> None:
        _check_total_steps("WarmupDecayLR", total_num_steps, warmup_num_steps)
        self.total_num_steps = total_num_steps
        self._init_warmup(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type)
        StepSchedule.__init__(self, optimizer, last_batch_iteration)

    def gamma(self, i: int) -> float:
        if i < self.warmup_num_steps:
            return _warmup_fraction(i, self.warmup_num_steps, self.warmup_type)
        return max(0.0, (self.total_num_steps - i) / max(1, self.total_num_steps - self.warmup_num_steps))


class WarmupCosineLR(StepSchedule):
    """Warm up a ratio of the optimizer's lr, then cosine-decay it to ``cos_min_ratio``.

    ``lr = base_lr * ratio``. While ``i < W``: ``ratio = warmup_min_ratio + (1 -
    warmup_min_ratio) * warmup(i)``. After: ``ratio = cos_min_ratio + (1 - cos_min_ratio)
    * (1 + cos(pi * p)) / 2`` with ``p = (i - W + 1) / (T - W)``. ``p`` is capped at 1, so
    after ``total_num_steps`` the ratio stays at ``cos_min_ratio`` where DeepSpeed's
    cosine would start rising again.
    """

    @validated_params("scheduler 'WarmupCosineLR'")
    def __init__(
        self,
        optimizer: Optimizer,
        *,
        total_num_steps: PositiveInt,
        warmup_min_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0,
        warmup_num_steps: NonNegativeInt = 1000,
        cos_min_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0001,
        warmup_type: WarmupType = "log",
        last_batch_iteration: LastBatchIteration = -1,
    ) -> None:
        _check_total_steps("WarmupCosineLR", total_num_steps, warmup_num_steps)
        self.total_num_steps = total_num_steps
        self.warmup_min_ratio = warmup_min_ratio
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.cos_min_ratio = cos_min_ratio
        self.warmup_type = warmup_type
        super().__init__(optimizer, last_batch_iteration)

    def ratio(self, i: int) -> float:
        """Multiplier of the optimizer's configured lr at DeepSpeed iteration ``i``."""
        if i < self.warmup_num_steps:
            warm = _warmup_fraction(i, self.warmup_num_steps, self.warmup_type)
            return self.warmup_min_ratio + (1.0 - self.warmup_min_ratio) * warm
        progress = min(1.0, (i - self.warmup_num_steps + 1) / max(1, self.total_num_steps - self.warmup_num_steps))
        return self.cos_min_ratio + (1.0 - self.cos_min_ratio) * (1.0 + math.cos(math.pi * progress)) / 2.0

    def lrs_at(self, step: int) -> list[float]:
        ratio = self.ratio(max(step - 1, 0))
        return [float(base) * ratio for base in self.base_lrs]
