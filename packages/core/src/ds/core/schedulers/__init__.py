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

Import everything from here: the schedules live in ``_warmup`` (the WarmupLR family) and
``_cycle`` (OneCycle, LRRangeTest) over the base class in ``_base``; this module is the
registry that a config's ``scheduler.type`` is looked up in.
"""

from __future__ import annotations

from collections.abc import Sequence
from difflib import get_close_matches
from typing import Any, Protocol

from torch.optim import Optimizer

from ds.core.errors import ConfigError
from ds.core.schedulers._base import StepSchedule
from ds.core.schedulers._cycle import LRRangeTest, OneCycle
from ds.core.schedulers._warmup import WarmupCosineLR, WarmupDecayLR, WarmupLR

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
