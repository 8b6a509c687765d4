"""Monitors (CSV, TensorBoard, wandb) and the console throughput log."""

from __future__ import annotations

import csv
import fcntl
import io
import logging
import os
import struct
import termios
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from ds.core.errors import ConfigError
from ds.core.monitors import LineProgressBar, MonitorGroup, ThroughputLogger, build_monitors, is_terminal
from ds.core.monitors.csv_monitor import CsvMonitor


@dataclass
class FileSection:
    enabled: bool = False
    output_path: str = ""
    job_name: str = "DeepSpeedJobName"


@dataclass
class WandbSection:
    enabled: bool = False
    team: str | None = None
    group: str | None = None
    project: str = "deepspeed"


@dataclass
class Config:
    """The attributes build_monitors reads from a DsConfig."""

    tensorboard: FileSection = field(default_factory=FileSection)
    csv_monitor: FileSection = field(default_factory=FileSection)
    wandb: WandbSection = field(default_factory=WandbSection)
    steps_per_print: int = 1


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def test_csv_monitor_writes_one_file_per_tag_in_deepspeeds_layout(tmp_path: Path) -> None:
    config = Config(csv_monitor=FileSection(enabled=True, output_path=str(tmp_path), job_name="run1"))
    monitors = build_monitors(config, rank=0)
    assert monitors.enabled
    monitors.write_events([("Train/Samples/train_loss", 2.5, 8), ("Train/Samples/lr", 1e-3, 8)])
    monitors.write_events([("Train/Samples/train_loss", torch.tensor(2.25), 16), ("eval loss", 3.0, 16)])
    monitors.close()
    job = tmp_path / "run1"
    assert sorted(p.name for p in job.iterdir()) == ["Train_Samples_lr.csv", "Train_Samples_train_loss.csv",
                                                     "eval_loss.csv"]
    assert read_csv(job / "Train_Samples_train_loss.csv") == [["step", "train_loss"], ["8", "2.5"], ["16", "2.25"]]
    assert read_csv(job / "Train_Samples_lr.csv") == [["step", "lr"], ["8", "0.001"]]
    assert read_csv(job / "eval_loss.csv") == [["step", "eval loss"], ["16", "3.0"]]


def test_csv_monitor_appending_after_a_restart_keeps_one_header(tmp_path: Path) -> None:
    CsvMonitor(tmp_path).write_events([("loss", 1.0, 1)])
    CsvMonitor(tmp_path).write_events([("loss", 0.5, 2)])
    assert read_csv(tmp_path / "loss.csv") == [["step", "loss"], ["1", "1.0"], ["2", "0.5"]]


def test_only_rank_zero_writes(tmp_path: Path) -> None:
    config = Config(csv_monitor=FileSection(enabled=True, output_path=str(tmp_path), job_name="run"))
    monitors = build_monitors(config, rank=1)
    assert not monitors.enabled
    monitors.write_events([("loss", 1.0, 1)])
    monitors.close()
    assert not (tmp_path / "run").exists()


def test_events_are_buffered_until_steps_per_print_calls(tmp_path: Path) -> None:
    config = Config(csv_monitor=FileSection(enabled=True, output_path=str(tmp_path), job_name="run"),
                    steps_per_print=3)
    monitors = build_monitors(config, rank=0)
    path = tmp_path / "run" / "loss.csv"
    for step in (1, 2):
        monitors.write_events([("loss", torch.tensor(float(step)), step)])
    assert not path.exists()
    monitors.write_events([("loss", 3.0, 3)])
    assert read_csv(path)[1:] == [["1", "1.0"], ["2", "2.0"], ["3", "3.0"]]
    monitors.write_events([("loss", 4.0, 4)])
    monitors.close()
    assert read_csv(path)[-1] == ["4", "4.0"]
    assert not monitors.enabled  # closed


def test_event_values_must_be_scalars(tmp_path: Path) -> None:
    group = MonitorGroup([CsvMonitor(tmp_path)])
    with pytest.raises(ValueError, match="one-element tensor"):
        group.write_events([("loss", torch.ones(2), 1)])


@pytest.mark.skipif(find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_monitor_writes_a_readable_event_file(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = Config(tensorboard=FileSection(enabled=True, output_path=str(tmp_path), job_name="tb"))
    monitors = build_monitors(config, rank=0)
    monitors.write_events([("Train/Samples/train_loss", 2.0, 8)])
    monitors.write_events([("Train/Samples/train_loss", torch.tensor(1.5), 16)])
    monitors.close()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("Train/Samples/train_loss")] == [(8, 2.0), (16, 1.5)]


@pytest.mark.skipif(find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_enabled_but_missing_names_the_pip_command(tmp_path: Path) -> None:
    config = Config(tensorboard=FileSection(enabled=True, output_path=str(tmp_path)))
    with pytest.raises(ConfigError, match=r'pip install "ds-core\[tensorboard\]"'):
        build_monitors(config, rank=1)


@pytest.mark.skipif(find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_enabled_but_missing_fails_on_every_rank_with_the_pip_command() -> None:
    for rank in (0, 1):
        with pytest.raises(ConfigError, match=r"'wandb' package is not installed.*pip install wandb"):
            build_monitors(Config(wandb=WandbSection(enabled=True)), rank=rank)


# -------------------------------------------------------------------------------------
# console
# -------------------------------------------------------------------------------------


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throughput_logger_format_and_cadence(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    logger = ThroughputLogger(steps_per_print=2, rank=0, stream=io.StringIO(), clock=clock)
    with caplog.at_level(logging.INFO, logger="ds.train"):
        for step in range(1, 6):
            clock.now += 0.5
            logger.record(step, loss=torch.tensor(float(step)), lr=1e-3, samples=8, tokens=64)
    assert [r.getMessage() for r in caplog.records] == [
        # steps 1-2: mean loss 1.5, 16 samples / 1 s, 128 tokens / 1 s
        "step 2 | loss 1.5000 | lr 1.000e-03 | 16.0 samples/s | 128.0 tokens/s",
        "step 4 | loss 3.5000 | lr 1.000e-03 | 16.0 samples/s | 128.0 tokens/s",
    ]


def test_throughput_logger_without_loss_or_tokens(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    logger = ThroughputLogger(steps_per_print=1, stream=io.StringIO(), clock=clock)
    clock.now += 2.0
    with caplog.at_level(logging.INFO, logger="ds.train"):
        logger.record(1, loss=None, lr=torch.tensor(0.5), samples=4)
    assert caplog.records[0].getMessage() == "step 1 | lr 5.000e-01 | 2.0 samples/s"


def test_throughput_logger_reads_the_loss_only_when_it_prints() -> None:
    # A meta tensor has no data: reading it (.item(), float()) raises, adding does not.
    logger = ThroughputLogger(steps_per_print=3, stream=io.StringIO())
    for step in (1, 2):
        logger.record(step, loss=torch.empty((), device="meta"), lr=1e-3, samples=8)
    with pytest.raises((NotImplementedError, RuntimeError)):
        logger.record(3, loss=torch.empty((), device="meta"), lr=1e-3, samples=8)


def test_throughput_logger_is_silent_off_rank_zero(caplog: pytest.LogCaptureFixture) -> None:
    logger = ThroughputLogger(steps_per_print=1, rank=1, stream=io.StringIO())
    with caplog.at_level(logging.INFO, logger="ds.train"):
        logger.record(1, loss=1.0, lr=1e-3, samples=8)
    assert caplog.records == []


def test_steps_per_print_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="steps_per_print"):
        ThroughputLogger(steps_per_print=0)


def test_progress_bar_only_on_a_terminal() -> None:
    redirected = io.StringIO()
    logger = ThroughputLogger(steps_per_print=100, stream=redirected)
    logger.record(1, loss=1.0, lr=1e-3, samples=8)
    logger.close()
    assert not is_terminal(redirected)
    assert redirected.getvalue() == ""

    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a real terminal has a size
    with os.fdopen(follower, "w") as terminal:
        assert is_terminal(terminal)
        logger = ThroughputLogger(steps_per_print=100, total_steps=4, stream=terminal)
        logger.record(1, loss=1.0, lr=1e-3, samples=8)
        logger.record(2, loss=1.0, lr=1e-3, samples=8)
        logger.close()
    # A pty hands its output over in pieces; read until the closed follower side reports the end.
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: everything written was read and the follower is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    drawn = b"".join(chunks).decode()
    assert "2/4" in drawn


def test_line_progress_bar_redraws_at_most_every_interval() -> None:
    clock = Clock()
    stream = io.StringIO()
    bar = LineProgressBar(stream, 10, min_interval=1.0, clock=clock)
    bar.advance_to(1)
    bar.advance_to(2)  # too soon: not drawn
    assert stream.getvalue() == "\rstep 1/10"
    clock.now += 1.0
    bar.advance_to(3)
    bar.show_status("loss 0.5")
    assert stream.getvalue().split("\r")[-1] == "step 3/10 loss 0.5"
    bar.clear()
    assert stream.getvalue().endswith("\r" + " " * len("step 3/10 loss 0.5") + "\r")
    bar.close()
    assert stream.getvalue().endswith("\n")
