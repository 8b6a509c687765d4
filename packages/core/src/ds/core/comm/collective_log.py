"""Optional record of every collective: which op, on which group, how many bytes, how long.

Enabled by ``communicator.log_collectives``. It answers "where does communication time
go?" and "did this change add collectives?" without a profiler: each collective is logged
at INFO on the ``ds.core.comm`` logger when it completes, the most recent ones are kept as
:class:`CollectiveRecord`, and :meth:`CollectiveLog.summary` totals count, bytes and
seconds per op for the whole run.

``nbytes`` is the size of the full, unsharded buffer: the reduced tensor for all_reduce,
the input of reduce_scatter, the output of all_gather, the input of all_to_all, the
broadcast tensor; 0 for barriers. ``seconds`` is host time from issuing the collective
to the end of the wait on it; on accelerators, where waits only order streams, it is
the launch cost rather than the transfer time.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from ds.core.comm.watchdog import Collective

MAX_RECORDS = 10_000
"""Records kept; older ones are dropped (the summary still counts them)."""

logger = logging.getLogger("ds.core.comm")


@dataclass
class CollectiveRecord:
    """One collective; ``seconds`` stays None until it has been waited on."""

    op: str
    group: str
    sequence: int
    nbytes: int
    seconds: float | None = None


@dataclass
class CollectiveStats:
    """Totals for one op; ``seconds`` covers the collectives that were waited on."""

    count: int = 0
    nbytes: int = 0
    seconds: float = 0.0


class CollectiveLog:
    """Records and per-op totals of the collectives one communicator issued."""

    def __init__(self, max_records: int = MAX_RECORDS) -> None:
        self._records: deque[CollectiveRecord] = deque(maxlen=max_records)
        self._stats: dict[str, CollectiveStats] = {}

    def started(self, collective: Collective, nbytes: int) -> CollectiveRecord:
        record = CollectiveRecord(collective.op, collective.group.label, collective.sequence, nbytes)
        self._records.append(record)
        stats = self._stats.setdefault(collective.op, CollectiveStats())
        stats.count += 1
        stats.nbytes += nbytes
        return record

    def finished(self, record: CollectiveRecord, collective: Collective) -> None:
        record.seconds = time.monotonic() - collective.started
        self._stats[record.op].seconds += record.seconds
        logger.info(
            "%s #%d on %s: %d bytes in %.3f ms",
            record.op, record.sequence, record.group, record.nbytes, record.seconds * 1e3,
        )

    @property
    def records(self) -> list[CollectiveRecord]:
        """The most recent collectives, oldest first."""
        return list(self._records)

    def summary(self) -> dict[str, CollectiveStats]:
        """Count, bytes and seconds per op since the communicator started."""
        return {op: CollectiveStats(s.count, s.nbytes, s.seconds) for op, s in sorted(self._stats.items())}

    def format_summary(self) -> str:
        """The summary as a small table, for logs and ``ds report``-style output."""
        lines = [f"{'op':<24}{'count':>10}{'MiB':>14}{'seconds':>12}"]
        for op, stats in self.summary().items():
            lines.append(f"{op:<24}{stats.count:>10}{stats.nbytes / 2**20:>14.2f}{stats.seconds:>12.3f}")
        return "\n".join(lines)


__all__ = ["CollectiveLog", "CollectiveRecord", "CollectiveStats"]
