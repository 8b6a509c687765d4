"""Console progress of a training run: a log line every few steps, a bar in a terminal."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Protocol, TextIO

import torch

from ds.core.errors import ConfigError

LOGGER_NAME = "ds.train"


class ProgressBar(Protocol):
    """A one-line progress display that log lines can interrupt cleanly."""

    def advance_to(self, step: int) -> None: ...

    def show_status(self, text: str) -> None: ...

    def clear(self) -> None: ...

    def close(self) -> None: ...


class LineProgressBar:
    """A carriage-return progress line, for terminals when tqdm is not installed.

    Redraws at most every ``min_interval`` seconds so a fast loop does not spend its
    time writing to the terminal.
    """

    def __init__(self, stream: TextIO, total: int | None, *, min_interval: float = 0.2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._total = total
        self._min_interval = min_interval
        self._clock = clock
        self._step = 0
        self._status = ""
        self._drawn_at: float | None = None
        self._width = 0

    def advance_to(self, step: int) -> None:
        self._step = step
        now = self._clock()
        if self._drawn_at is None or now - self._drawn_at >= self._min_interval:
            self._draw(now)

    def show_status(self, text: str) -> None:
        self._status = text
        self._draw(self._clock())

    def clear(self) -> None:
        if self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
            self._width = 0

    def close(self) -> None:
        if self._drawn_at is not None:
            self._draw(self._clock())
            self._stream.write("\n")
            self._stream.flush()

    def _draw(self, now: float) -> None:
        position = f"step {self._step}" + (f"/{self._total}" if self._total else "")
        line = f"{position} {self._status}".rstrip()
        self._stream.write("\r" + line.ljust(self._width))
        self._stream.flush()
        self._width = len(line)
        self._drawn_at = now


class _TqdmBar:
    def __init__(self, stream: TextIO, total: int | None) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, file=stream, unit="step", dynamic_ncols=True)

    def advance_to(self, step: int) -> None:
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def show_status(self, text: str) -> None:
        self._bar.set_postfix_str(text, refresh=True)

    def clear(self) -> None:
        self._bar.clear()

    def close(self) -> None:
        self._bar.close()


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (closed or odd streams are not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(stream: TextIO, total: int | None) -> ProgressBar | None:
    """tqdm if installed, else :class:`LineProgressBar`; None when ``stream`` is not a terminal.

    Redirected output (files, CI logs) gets no bar: carriage returns only clutter them.
    """
    if not is_terminal(stream):
        return None
    try:
        return _TqdmBar(stream, total)
    except ImportError:
        return LineProgressBar(stream, total)


class ThroughputLogger:
    """Logs ``step | loss | lr | samples/s | tokens/s`` every ``steps_per_print`` steps on rank 0.

    The engine calls :meth:`record` after every optimizer step. Nothing here forces a
    host-device sync per step: a tensor loss is summed on its device and read with one
    ``.item()`` only on the steps that print. That sync also makes the rates honest: the
    window's clock stops after the device has finished the window's work. The loss
    printed is the mean over the steps since the previous line; ``tokens/s`` appears
    when the engine reports tokens. Lines go to the ``ds.train`` logger at INFO; a
    progress bar is drawn on ``stream`` (stdout by default) only when it is a terminal.
    """

    def __init__(
        self,
        *,
        steps_per_print: int,
        rank: int = 0,
        total_steps: int | None = None,
        logger: logging.Logger | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if steps_per_print < 1:
            raise ConfigError(f"steps_per_print must be at least 1, got {steps_per_print}.")
        self.steps_per_print = steps_per_print
        self.active = rank == 0
        self._logger = logger or logging.getLogger(LOGGER_NAME)
        self._clock = clock
        self._bar = progress_bar(stream or sys.stdout, total_steps) if self.active else None
        self._reset_window()

    def _reset_window(self) -> None:
        self._window_start = self._clock()
        self._samples = 0
        self._tokens = 0
        self._loss_sum: torch.Tensor | float | None = None
        self._loss_count = 0

    def record(self, step: int, loss: torch.Tensor | float | None, lr: float | torch.Tensor,
               samples: int, tokens: int | None = None) -> None:
        """Account one optimizer step: global ``samples`` and ``tokens`` it processed."""
        if not self.active:
            return
        self._samples += samples
        self._tokens += tokens or 0
        if loss is not None:
            value = loss.detach().float() if isinstance(loss, torch.Tensor) else float(loss)
            self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
            self._loss_count += 1
        if self._bar is not None:
            self._bar.advance_to(step)
        if step % self.steps_per_print == 0:
            self._print(step, float(lr))

    def _print(self, step: int, lr: float) -> None:
        loss = float(self._loss_sum) / self._loss_count if self._loss_sum is not None else None  # the host sync
        elapsed = max(self._clock() - self._window_start, 1e-9)
        status = ([] if loss is None else [f"loss {loss:.4f}"]) + [f"lr {lr:.3e}"]
        rates = [f"{self._samples / elapsed:.1f} samples/s"]
        if self._tokens:
            rates.append(f"{self._tokens / elapsed:.1f} tokens/s")
        if self._bar is not None:
            self._bar.clear()
        self._logger.info(" | ".join([f"step {step}", *status, *rates]))
        if self._bar is not None:
            self._bar.show_status(" ".join(status))
        self._reset_window()

    def close(self) -> None:
        """End the progress bar's line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
