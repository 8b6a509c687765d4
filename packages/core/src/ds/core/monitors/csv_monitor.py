"""Local CSV files in DeepSpeed's ``csv_monitor`` layout."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


class CsvMonitor:
    """One CSV file per tag under ``log_dir`` (DeepSpeed's ``output_path/job_name``).

    The file name is the tag with ``/`` and spaces replaced by ``_`` (``Train/Samples/lr``
    -> ``Train_Samples_lr.csv``); its header is ``step,<last tag segment>`` and each event
    appends a ``step,value`` row. Unlike DeepSpeed, a resumed run appending to an existing
    file does not write the header a second time.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def path_for(self, tag: str) -> Path:
        return self.log_dir / (tag.replace("/", "_").replace(" ", "_") + ".csv")

    def write_events(self, events: Sequence[tuple[str, float, int]]) -> None:
        rows: dict[str, list[tuple[int, float]]] = {}
        for tag, value, step in events:
            rows.setdefault(tag, []).append((step, value))
        for tag, tag_rows in rows.items():
            path = self.path_for(tag)
            is_new = not path.exists() or path.stat().st_size == 0
            with path.open("a", newline="") as handle:
                writer = csv.writer(handle)
                if is_new:
                    writer.writerow(["step", tag.rsplit("/", 1)[-1]])
                writer.writerows(tag_rows)

    def close(self) -> None:
        """Nothing stays open between writes."""
