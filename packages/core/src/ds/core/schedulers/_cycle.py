"""Schedules that sweep the lr rather than warm it up: OneCycle and LRRangeTest."""

from __future__ import annotations

import logging
import math

from torch.optim import Optimizer

from ds.core.optimizers import validated_params
from ds.core.schedulers._base import (
    LastBatchIteration,
    NonNegativeInt,
    PerGroup,
    PositiveInt,
    StepSchedule,
    per_group,
)

logger = logging.getLogger(__name__)


class OneCycle(StepSchedule):
    """The 1cycle policy: lr up for ``cycle_first_step_size`` steps, down for the second, then decay.

    With ``n`` steps taken: ``scale = n / first`` up to the peak at ``n = first``, then
    ``1 - (n - first) / second`` down to 0 at ``n = first + second``; ``lr = cycle_min_lr
    + (cycle_max_lr - cycle_min_lr) * scale``. A stair count ``k > 0`` rounds that half's
    progress down to a multiple of ``1/k``. After the cycle, ``lr = cycle_min_lr / (1 +
    decay_lr_rate * d / decay_step_size)`` with ``d`` steps since the cycle ended
    (``decay_step_size`` 0 keeps ``cycle_min_lr``). Either bound may be one value per param
    group; ``cycle_max_lr`` defaults to each group's configured lr.

    Momentum moves against the lr: ``cycle_max_mom - (cycle_max_mom - cycle_min_mom) *
    scale``, then ``cycle_max_mom * (1 + decay_mom_rate * d / decay_step_size)``. It drives
    ``betas[0]`` (beta2 kept as configured) or ``momentum``, whichever the optimizer has;
    DeepSpeed instead forces beta2 to 0.99, skips optimizers without betas, and starts
    from ``cycle_min_mom`` rather than the formula's value at step 0.
    """

    @validated_params("scheduler 'OneCycle'")
    def __init__(
        self,
        optimizer: Optimizer,
        *,
        cycle_min_lr: PerGroup,
        cycle_max_lr: PerGroup | None = None,
        decay_lr_rate: float = 0.0,
        cycle_first_step_size: PositiveInt = 2000,
        cycle_second_step_size: PositiveInt | None = None,
        cycle_first_stair_count: int = 0,
        cycle_second_stair_count: int | None = None,
        decay_step_size: NonNegativeInt = 0,
        cycle_momentum: bool = True,
        cycle_min_mom: float = 0.8,
        cycle_max_mom: float = 0.9,
        decay_mom_rate: float = 0.0,
        last_batch_iteration: LastBatchIteration = -1,
    ) -> None:
        if cycle_max_lr is None:
            cycle_max_lr = [float(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]
        self.min_lrs = per_group("OneCycle", optimizer, cycle_min_lr, "cycle_min_lr")
        self.max_lrs = per_group("OneCycle", optimizer, cycle_max_lr, "cycle_max_lr")
        self.decay_lr_rate = decay_lr_rate
        self.first_step_size = cycle_first_step_size
        self.second_step_size = cycle_second_step_size or cycle_first_step_size
        self.first_stair_count = cycle_first_stair_count
        self.second_stair_count = (cycle_first_stair_count if cycle_second_stair_count is None
                                   else cycle_second_stair_count)
        self.decay_step_size = decay_step_size
        self.cycle_min_mom = cycle_min_mom
        self.cycle_max_mom = cycle_max_mom
        self.decay_mom_rate = decay_mom_rate
        self.momentum_key = _momentum_key(optimizer) if cycle_momentum else None
        if cycle_momentum and self.momentum_key is None:
            logger.warning("OneCycle: %s has neither betas nor momentum; momentum is not cycled.",
                           type(optimizer).__name__)
        super().__init__(optimizer, last_batch_iteration)

    @property
    def cycle_length(self) -> int:
        return self.first_step_size + self.second_step_size

    def scale(self, step: int) -> float:
        """Position between the cycle's low (0) and peak (1) after ``step`` steps."""
        if step <= self.first_step_size:
            return _stairs(step / self.first_step_size, self.first_stair_count)
        return 1.0 - _stairs((step - self.first_step_size) / self.second_step_size, self.second_stair_count)

    def _decay_intervals(self, step: int) -> float:
        return (step - self.cycle_length) / self.decay_step_size

    def lrs_at(self, step: int) -> list[float]:
        if step <= self.cycle_length:
            scale = self.scale(step)
            return [low + (high - low) * scale for low, high in zip(self.min_lrs, self.max_lrs, strict=True)]
        if self.decay_step_size == 0:
            return list(self.min_lrs)
        divisor = 1.0 + self.decay_lr_rate * self._decay_intervals(step)
        return [low / divisor for low in self.min_lrs]

    def momentum_at(self, step: int) -> float:
        """The cycled momentum (or beta1) after ``step`` steps."""
        if step <= self.cycle_length:
            return self.cycle_max_mom - (self.cycle_max_mom - self.cycle_min_mom) * self.scale(step)
        if self.decay_step_size == 0:
            return self.cycle_max_mom
        return self.cycle_max_mom * (1.0 + self.decay_mom_rate * self._decay_intervals(step))

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        self._apply_momentum(self.last_epoch)

    def _apply(self, step: int) -> None:
        super()._apply(step)
        self._apply_momentum(step)

    def _apply_momentum(self, step: int) -> None:
        if self.momentum_key is None:
            return
        momentum = self.momentum_at(step)
        for group in self.optimizer.param_groups:
            if self.momentum_key == "betas":
                group["betas"] = (momentum, group["betas"][1])
            else:
                group["momentum"] = momentum


def _momentum_key(optimizer: Optimizer) -> str | None:
    for key in ("betas", "momentum"):
        if key in optimizer.defaults:
            return key
    return None


def _stairs(progress: float, count: int) -> float:
    return math.floor(progress * count) / count if count > 0 else progress


class LRRangeTest(StepSchedule):
    """Grow the lr from ``lr_range_test_min_lr`` to find the largest rate that still trains.

    ``lr = min_lr * (1 + lr_range_test_step_rate * x)`` with ``x = i / step_size``, or
    ``floor(i / step_size)`` when ``lr_range_test_staircase`` is true.
    """

    @validated_params("scheduler 'LRRangeTest'")
    def __init__(
        self,
        optimizer: Optimizer,
        *,
        lr_range_test_min_lr: PerGroup = 1e-3,
        lr_range_test_step_size: PositiveInt = 2000,
        lr_range_test_step_rate: float = 1.0,
        lr_range_test_staircase: bool = False,
        last_batch_iteration: LastBatchIteration = -1,
    ) -> None:
        self.min_lrs = per_group("LRRangeTest", optimizer, lr_range_test_min_lr, "lr_range_test_min_lr")
        self.step_size = lr_range_test_step_size
        self.step_rate = lr_range_test_step_rate
        self.staircase = lr_range_test_staircase
        super().__init__(optimizer, last_batch_iteration)

    def lrs_at(self, step: int) -> list[float]:
        intervals = max(step - 1, 0) / self.step_size
        if self.staircase:
            intervals = math.floor(intervals)
        return [low * (1.0 + self.step_rate * intervals) for low in self.min_lrs]
