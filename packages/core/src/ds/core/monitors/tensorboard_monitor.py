"""TensorBoard event files through ``torch.utils.tensorboard``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ds.core.monitors.optional import require_module


def require_tensorboard() -> None:
    require_module("tensorboard", feature="tensorboard", install='pip install "ds-core[tensorboard]"')


class TensorBoardMonitor:
    """Scalars written with a ``SummaryWriter`` in ``log_dir`` (``output_path/job_name``)."""

    def __init__(self, log_dir: Path) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def write_events(self, events: Sequence[tuple[str, float, int]]) -> None:
        for tag, value, step in events:
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
