"""Where a training step's GPU time goes: busy time per CUDA stream and the compute stream's gaps.

A throughput number says how fast a mode runs, not what it waits for. This profiles a few
steps after the timed ones (so the timing is untouched) and reduces the kernel timeline to the
three questions that decide what to optimise next:

- how much of the step the compute stream (the one with the most kernel time) is busy; the rest
  is exposed waiting, for the host (launch overhead), a collective or a copy;
- what every other stream (NCCL's, copy engines') runs, and how much of it overlaps compute;
- the longest idle gaps on the compute stream, each with the kernels on either side and what
  other streams ran inside it, which names the cause.

``train_llm.py --profile-steps N`` writes ``profiles/<mode>-<G>gpu-mb<B>/rank{R}.json`` (this
summary) and a Chrome trace ``rank{R}.trace.json.gz`` beside its ``--out`` file, for a closer
look in Perfetto.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

Interval = tuple[float, float]  # start, end in microseconds
GAP_SHOWN_US = 50.0  # shorter gaps are launch jitter, counted in the idle total but not listed


def profile_steps(step: Callable[[], Any], steps: int, out_dir: Path, rank: int) -> dict[str, Any]:
    """Runs ``step`` ``steps`` times under the profiler and writes the summary and the trace."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    trace = out_dir / f"rank{rank}.trace.json"
    prof.export_chrome_trace(str(trace))
    summary = summarize(json.loads(trace.read_text()), steps)
    with trace.open("rb") as raw, gzip.open(f"{trace}.gz", "wb") as packed:
        shutil.copyfileobj(raw, packed)
    trace.unlink()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(summary, indent=1))
    return summary


def summarize(trace: dict[str, Any], steps: int) -> dict[str, Any]:
    """Reduces a Chrome trace's GPU kernels and copies to per-step busy times and gaps."""
    by_stream: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
    for event in trace.get("traceEvents", []):
        if event.get("ph") == "X" and event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            start = float(event["ts"])
            by_stream[int(event["args"].get("stream", -1))].append((start, start + float(event["dur"]), event["name"]))
    if not by_stream:
        raise ValueError("the trace holds no GPU kernels: was the step run on a CUDA device?")
    for events in by_stream.values():
        events.sort()
    begin = min(events[0][0] for events in by_stream.values())
    end = max(max(e[1] for e in events) for events in by_stream.values())
    step_us = (end - begin) / steps
    busy = {stream: _union([(s, e) for s, e, _ in events]) for stream, events in by_stream.items()}
    compute = max(busy, key=lambda stream: _length(busy[stream]))
    others = _union([iv for stream, intervals in busy.items() if stream != compute for iv in intervals])
    gaps = _gaps(busy[compute], begin, end)
    return {
        "steps": steps,
        "step_ms": step_us / 1e3,
        "compute_stream": compute,
        "compute_busy_pct": 100 * _length(busy[compute]) / (end - begin),
        "compute_idle_ms_per_step": (end - begin - _length(busy[compute])) / steps / 1e3,
        "other_streams_while_compute_idle_ms_per_step": _length(_intersect(gaps, others)) / steps / 1e3,
        "streams": {
            str(stream): {
                "busy_ms_per_step": _length(busy[stream]) / steps / 1e3,
                "top_kernels_ms_per_step": _top_kernels(events, steps),
            }
            for stream, events in sorted(by_stream.items(), key=lambda item: -_length(busy[item[0]]))
        },
        "longest_compute_gaps": [
            _describe_gap(gap, by_stream, compute)
            for gap in sorted(gaps, key=lambda g: g[0] - g[1])[:12]
            if gap[1] - gap[0] >= GAP_SHOWN_US
        ],
    }


def _union(intervals: list[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(intervals: list[Interval]) -> float:
    return sum(end - start for start, end in intervals)


def _gaps(busy: list[Interval], begin: float, end: float) -> list[Interval]:
    edges = [begin, *(t for interval in busy for t in interval), end]
    return [(edges[i], edges[i + 1]) for i in range(0, len(edges), 2) if edges[i + 1] > edges[i]]


def _intersect(a: list[Interval], b: list[Interval]) -> list[Interval]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _top_kernels(events: list[tuple[float, float, str]], steps: int, count: int = 8) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for start, end, name in events:
        totals[name[:90]] += end - start
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:count]
    return {name: round(us / steps / 1e3, 3) for name, us in ranked}


def _describe_gap(gap: Interval, by_stream: dict[int, list[tuple[float, float, str]]], compute: int) -> dict[str, Any]:
    start, end = gap
    kernels = by_stream[compute]
    ended = [kernel for kernel in kernels if kernel[1] <= start]
    before = max(ended, key=lambda kernel: kernel[1])[2] if ended else "(step start)"
    after = next((name for s, e, name in kernels if s >= end), "(step end)")
    overlapping = sorted(
        {
            name[:60]
            for stream, events in by_stream.items()
            if stream != compute
            for s, e, name in events
            if s < end and e > start
        }
    )
    return {"us": round(end - start, 1), "after": before[:90], "before": after[:90], "other_streams": overlapping[:4]}
