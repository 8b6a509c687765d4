"""Where training metrics go: monitors (CSV, TensorBoard, wandb) and the console log.

    monitors = build_monitors(config, rank)            # rank 0 writes, others no-op
    monitors.write_events([("Train/Samples/train_loss", loss, samples_seen)])
    throughput = ThroughputLogger(steps_per_print=10, rank=rank)
    throughput.record(step, loss=loss, lr=lr, samples=batch_size, tokens=batch_tokens)

Monitors follow DeepSpeed's config sections (``csv_monitor``, ``tensorboard``, ``wandb``)
and file layouts. TensorBoard and wandb are optional packages; enabling one that is not
installed fails when monitors are built, with the pip command that fixes it.
"""

from __future__ import annotations

from ds.core.monitors.csv_monitor import CsvMonitor
from ds.core.monitors.group import Event, Monitor, MonitorGroup, build_monitors
from ds.core.monitors.tensorboard_monitor import TensorBoardMonitor
from ds.core.monitors.throughput import LineProgressBar, ThroughputLogger, is_terminal, progress_bar
from ds.core.monitors.wandb_monitor import WandbMonitor

__all__ = [
    "CsvMonitor",
    "Event",
    "LineProgressBar",
    "Monitor",
    "MonitorGroup",
    "TensorBoardMonitor",
    "ThroughputLogger",
    "WandbMonitor",
    "build_monitors",
    "is_terminal",
    "progress_bar",
]
