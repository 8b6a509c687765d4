"""Fan training events out to the monitors a config enables, on rank 0 only."""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import torch

from ds.core.monitors.csv_monitor import CsvMonitor
from ds.core.monitors.tensorboard_monitor import TensorBoardMonitor, require_tensorboard
from ds.core.monitors.wandb_monitor import WandbMonitor, require_wandb

Event = tuple[str, float | torch.Tensor, int]
"""``(tag, value, step)`` as DeepSpeed's monitors take it; value a number or a 1-element tensor."""


class Monitor(Protocol):
    """A sink for ``(tag, value, step)`` events with plain float values."""

    def write_events(self, events: Sequence[tuple[str, float, int]]) -> None: ...

    def close(self) -> None: ...


class MonitorGroup:
    """Every enabled monitor of a run; empty, and free to call, on ranks other than 0.

    Events are buffered and written every ``flush_every`` calls of :meth:`write_events`
    (and on :meth:`flush`, :meth:`close`, or interpreter exit). Values may be device
    tensors: they are converted together when the buffer flushes, so an engine can
    record a device-side loss every step with one host sync per flush, not per step.
    """

    def __init__(self, monitors: Sequence[Monitor] = (), *, flush_every: int = 1) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.monitors = list(monitors)
        self.flush_every = flush_every
        self._pending: list[Event] = []
        self._pending_calls = 0
        self._closer = weakref.finalize(self, _flush_and_close, self._pending, self.monitors)

    @property
    def enabled(self) -> bool:
        return bool(self.monitors)

    def write_events(self, events: Iterable[Event]) -> None:
        if not self.monitors:
            return
        for tag, value, step in events:
            if isinstance(value, torch.Tensor) and value.numel() != 1:
                raise ValueError(f"monitor event {tag!r}: value must be a number or a one-element tensor, "
                                 f"got shape {tuple(value.shape)}")
            self._pending.append((tag, value, int(step)))
        self._pending_calls += 1
        if self._pending_calls >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write buffered events to every monitor now."""
        _flush(self._pending, self.monitors)
        self._pending_calls = 0

    def close(self) -> None:
        """Flush and close every monitor; later calls do nothing."""
        self._closer()


def _flush(pending: list[Event], monitors: list[Monitor]) -> None:
    if not pending:
        return
    events = _as_floats(pending)
    pending.clear()
    for monitor in monitors:
        monitor.write_events(events)


def _flush_and_close(pending: list[Event], monitors: list[Monitor]) -> None:
    _flush(pending, monitors)
    for monitor in monitors:
        monitor.close()
    monitors.clear()


def _as_floats(events: list[Event]) -> list[tuple[str, float, int]]:
    """Convert tensor values with one device-to-host copy per device."""
    by_device: dict[torch.device, list[int]] = {}
    for index, (_, value, _) in enumerate(events):
        if isinstance(value, torch.Tensor):
            by_device.setdefault(value.device, []).append(index)
    converted: dict[int, float] = {}
    for indices in by_device.values():
        stacked = torch.stack([events[i][1].detach().float().reshape(()) for i in indices])  # type: ignore[union-attr]
        converted.update(zip(indices, stacked.tolist(), strict=True))
    return [(tag, converted[i] if i in converted else float(value), step)
            for i, (tag, value, step) in enumerate(events)]


class FileMonitorSection(Protocol):
    """``tensorboard`` / ``csv_monitor`` config sections (ds.core.config.MonitorConfig)."""

    enabled: bool
    output_path: str
    job_name: str


class WandbSection(Protocol):
    """The ``wandb`` config section (ds.core.config.WandbConfig)."""

    enabled: bool
    team: str | None
    group: str | None
    project: str | None


class MonitoredConfig(Protocol):
    """What :func:`build_monitors` reads from a ``DsConfig``."""

    tensorboard: FileMonitorSection
    csv_monitor: FileMonitorSection
    wandb: WandbSection
    steps_per_print: int


def build_monitors(config: MonitoredConfig, rank: int) -> MonitorGroup:
    """The monitors ``config`` enables, writing on ``rank`` 0; an empty group elsewhere.

    Missing packages for enabled monitors are reported on every rank (a ConfigError with
    the pip command). Buffered events flush every ``steps_per_print`` steps, in step with
    the console log, whose own host sync they then share.
    """
    if config.tensorboard.enabled:
        require_tensorboard()
    if config.wandb.enabled:
        require_wandb()
    if rank != 0:
        return MonitorGroup()
    monitors: list[Monitor] = []
    if config.csv_monitor.enabled:
        monitors.append(CsvMonitor(_log_dir(config.csv_monitor)))
    if config.tensorboard.enabled:
        monitors.append(TensorBoardMonitor(_log_dir(config.tensorboard)))
    if config.wandb.enabled:
        wandb = config.wandb
        monitors.append(WandbMonitor(project=wandb.project, group=wandb.group, team=wandb.team))
    return MonitorGroup(monitors, flush_every=max(1, config.steps_per_print))


def _log_dir(section: FileMonitorSection) -> Path:
    """DeepSpeed's ``output_path/job_name``; an empty output_path means the working directory."""
    return Path(section.output_path or ".") / section.job_name
