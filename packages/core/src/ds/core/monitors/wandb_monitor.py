"""Weights & Biases runs, when ``wandb`` is installed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ds.core.monitors.optional import require_module


def require_wandb() -> None:
    require_module("wandb", feature="wandb", install="pip install wandb")


class WandbMonitor:
    """Logs each step's events as one ``wandb`` record; ``team`` is wandb's entity."""

    def __init__(self, *, project: str | None, group: str | None, team: str | None) -> None:
        require_wandb()
        import wandb

        self._run: Any = wandb.init(project=project, group=group, entity=team)

    def write_events(self, events: Sequence[tuple[str, float, int]]) -> None:
        by_step: dict[int, dict[str, float]] = {}
        for tag, value, step in events:
            by_step.setdefault(step, {})[tag] = value
        for step in sorted(by_step):
            self._run.log(by_step[step], step=step)

    def close(self) -> None:
        self._run.finish()
