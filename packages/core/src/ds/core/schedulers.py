"""DeepSpeed's learning-rate schedules, as torch ``LRScheduler`` subclasses.

A DeepSpeed config names a schedule and its parameters::

    "scheduler": {"type": "WarmupDecayLR",
                  "params": {"warmup_max_lr": 3e-4, "warmup_num_steps": 1000, "total_num_steps": 100000}}

The engine calls ``step()`` after every optimizer step, as DeepSpeed does. Each schedule
is a closed-form function of ``n``, the number of ``step()`` calls so far (torch's
``last_epoch``; 0 right after construction). DeepSpeed writes its formulas in terms of
``last_batch_iteration``, which is ``n - 1``; the formulas below use ``i = max(n - 1, 0)``
where DeepSpeed does, so a ported config produces the same learning rate at every step.

State is only the step count (``{"last_epoch": n}``, JSON); every hyperparameter comes from
the config, so a resumed run follows the schedule its config describes. DeepSpeed's
``last_batch_iteration`` parameter starts a schedule part-way (``n = last_batch_iteration
+ 1``); -1, the default, starts it at the beginning.
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from collections.abc import Sequence
from difflib import get_close_matches
from typing import Annotated, Any, Literal, Protocol

import torch
from pydantic import Field
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ds.core.errors import CheckpointError, ConfigError
from ds.core.optimizers import validated_params

logger = logging.getLogger(__name__)

WarmupType = Literal["log", "linear"]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(gt=0)]
LastBatchIteration = Annotated[int, Field(ge=-1)]
PerGroup = float | list[float]
"""One value for every param group, or one per group (DeepSpeed allows both)."""


def _per_group(owner: str, optimizer: Optimizer, value: PerGroup, name: str) -> list[float]:
    groups = len(optimizer.param_groups)
    if isinstance(value, list):
        if len(value) != groups:
            raise ConfigError(f"scheduler {owner!r}: {name} has {len(value)} values for {groups} param groups; "
                              "give one value, or one per group.")
        return list(value)
    return [value] * groups


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
        self.min_lrs = _per_group(owner, optimizer, min_lr, "warmup_min_lr")
        self.max_lrs = _per_group(owner, optimizer, max_lr, "warmup_max_lr")
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
        self.min_lrs = _per_group("OneCycle", optimizer, cycle_min_lr, "cycle_min_lr")
        self.max_lrs = _per_group("OneCycle", optimizer, cycle_max_lr, "cycle_max_lr")
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
        self.min_lrs = _per_group("LRRangeTest", optimizer, lr_range_test_min_lr, "lr_range_test_min_lr")
        self.step_size = lr_range_test_step_size
        self.step_rate = lr_range_test_step_rate
        self.staircase = lr_range_test_staircase
        super().__init__(optimizer, last_batch_iteration)

    def lrs_at(self, step: int) -> list[float]:
        intervals = max(step - 1, 0) / self.step_size
        if self.staircase:
            intervals = math.floor(intervals)
        return [low * (1.0 + self.step_rate * intervals) for low in self.min_lrs]


SCHEDULERS: dict[str, type[StepSchedule]] = {
    cls.__name__: cls for cls in (WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest)
}
"""DeepSpeed's scheduler types by the name a config's ``scheduler.type`` uses."""


class SchedulerSpec(Protocol):
    """What :func:`build_scheduler` reads from ``ds.core.config.SchedulerConfig``."""

    type: str
    params: dict[str, Any]


def build_scheduler(config: SchedulerSpec, optimizer: Optimizer) -> StepSchedule:
    """Build the schedule a config's ``scheduler`` section names, driving ``optimizer``.

    The type matches case-insensitively; an unknown type or parameter is a ConfigError
    naming the closest valid one.
    """
    by_lower = {name.lower(): cls for name, cls in SCHEDULERS.items()}
    cls = by_lower.get(config.type.lower())
    if cls is None:
        known: Sequence[str] = sorted(SCHEDULERS)
        close = get_close_matches(config.type, known, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"scheduler.type {config.type!r} is unknown.{hint} Known schedulers: {', '.join(known)}.")
    return cls(optimizer, **dict(config.params or {}))


__all__ = [
    "SCHEDULERS",
    "LRRangeTest",
    "OneCycle",
    "SchedulerSpec",
    "StepSchedule",
    "WarmupCosineLR",
    "WarmupDecayLR",
    "WarmupLR",
    "build_scheduler",
]
