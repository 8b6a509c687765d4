"""DeepSpeed's learning-rate schedules: their names and the parameters each accepts.

The config checks ``scheduler.params`` at load time against these models, so a typo or a
fractional step count fails when the config loads rather than when the scheduler is
built. Every field defaults to None, meaning "the schedule's own default": the
scheduler factory (``ds.core.schedulers``) owns the defaults, so the resolved
``params`` hold only what the user set (with integral floats made ints and ``"auto"``
resolved as :mod:`ds.core.config.auto` documents).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, NonNegativeInt, PositiveInt

from ds.core.config.auto import AutoContext, AutoResolve
from ds.core.config.base import SectionModel

LearningRate = Annotated[float, Field(ge=0)] | list[Annotated[float, Field(ge=0)]]
"""One rate for all parameter groups, or one per group."""



def _total_steps(context: AutoContext) -> int:
    """``"auto"`` for a schedule's length: only the caller can know it."""
    if context.total_num_steps is None:
        raise ValueError(
            "ds cannot know how many optimizer steps your run has. Set it to that number, "
            "or pass total_num_steps= to ds.core.config.load_config."
        )
    return context.total_num_steps


PeakRate = Annotated[LearningRate | None, AutoResolve(lambda ctx: ctx.learning_rate)]
"""``"auto"``: the optimizer's lr when the config sets one, else (None) the schedule's default."""
TotalSteps = Annotated[PositiveInt | None, AutoResolve(_total_steps)]


class _ScheduleParams(SectionModel):
    last_batch_iteration: int | None = None


class WarmupLRParams(_ScheduleParams):
    """Warm up from ``warmup_min_lr`` to ``warmup_max_lr``, then hold."""

    warmup_min_lr: Annotated[LearningRate | None, AutoResolve(lambda ctx: 0.0)] = None
    warmup_max_lr: PeakRate = None
    warmup_num_steps: NonNegativeInt | None = None
    warmup_type: Literal["log", "linear"] | None = None


class WarmupDecayLRParams(WarmupLRParams):
    """Warm up, then decay linearly to zero at ``total_num_steps``."""

    total_num_steps: TotalSteps = None


class WarmupCosineLRParams(_ScheduleParams):
    """Warm up as a ratio of the optimizer's lr, then follow a cosine to ``cos_min_ratio``."""

    total_num_steps: TotalSteps = None
    warmup_min_ratio: Annotated[float, Field(ge=0)] | None = None
    warmup_num_steps: NonNegativeInt | None = None
    cos_min_ratio: Annotated[float, Field(ge=0)] | None = None
    warmup_type: Literal["log", "linear"] | None = None


class OneCycleParams(_ScheduleParams):
    """Cycle the lr (and optionally momentum) once between two bounds, then decay."""

    cycle_min_lr: LearningRate | None = None
    cycle_max_lr: PeakRate = None
    decay_lr_rate: float | None = None
    cycle_first_step_size: PositiveInt | None = None
    cycle_second_step_size: int | None = None
    cycle_first_stair_count: int | None = None
    cycle_second_stair_count: int | None = None
    decay_step_size: NonNegativeInt | None = None
    cycle_momentum: bool | None = None
    cycle_min_mom: float | None = None
    cycle_max_mom: float | None = None
    decay_mom_rate: float | None = None


class LRRangeTestParams(_ScheduleParams):
    """Raise the lr steadily from a start value, to find the largest one that trains."""

    lr_range_test_min_lr: PeakRate = None
    lr_range_test_step_size: PositiveInt | None = None
    lr_range_test_step_rate: float | None = None
    lr_range_test_staircase: bool | None = None


SCHEDULE_PARAMS: dict[str, type[SectionModel]] = {
    "WarmupLR": WarmupLRParams,
    "WarmupDecayLR": WarmupDecayLRParams,
    "WarmupCosineLR": WarmupCosineLRParams,
    "OneCycle": OneCycleParams,
    "LRRangeTest": LRRangeTestParams,
}
"""DeepSpeed's schedule names (as ``scheduler.type`` spells them) -> their parameters."""
