"""The step profiler's reduction of a kernel timeline (tools/bench/step_profile.py), on a
hand-made trace whose busy times, gaps and overlaps are known exactly. The profiler itself
runs only on CUDA (the GPU benchmark uses it through ``train_llm.py --profile-steps``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))
import step_profile  # noqa: E402

COMPUTE, NCCL = 7, 20


def kernel(stream: int, start: float, duration: float, name: str) -> dict:
    return {"ph": "X", "cat": "kernel", "ts": start, "dur": duration, "name": name, "args": {"stream": stream}}


def test_busy_time_gaps_and_what_other_streams_ran_inside_them() -> None:
    trace = {
        "traceEvents": [
            kernel(COMPUTE, 0, 100, "gemm_a"),
            kernel(COMPUTE, 150, 100, "gemm_b"),
            kernel(COMPUTE, 180, 20, "gemm_b_tail"),  # overlaps gemm_b: counted once
            kernel(NCCL, 90, 80, "ncclReduceScatter"),
            kernel(NCCL, 260, 30, "ncclAllGather"),
            kernel(COMPUTE, 400, 100, "adam"),
            {"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 1000, "name": "aten::mm", "args": {}},  # host: ignored
        ]
    }
    summary = step_profile.summarize(trace, steps=2)
    assert summary["compute_stream"] == COMPUTE
    assert summary["step_ms"] == pytest.approx(0.25)
    assert summary["compute_busy_pct"] == pytest.approx(60.0)
    assert summary["compute_idle_ms_per_step"] == pytest.approx(0.1)
    # 150-170 of the reduce-scatter and all of the all-gather fall in compute gaps.
    assert summary["other_streams_while_compute_idle_ms_per_step"] == pytest.approx(0.04)
    assert summary["streams"][str(NCCL)]["top_kernels_ms_per_step"] == {
        "ncclReduceScatter": pytest.approx(0.04),
        "ncclAllGather": pytest.approx(0.015),
    }
    gaps = summary["longest_compute_gaps"]
    assert [gap["us"] for gap in gaps] == [150.0, 50.0]
    assert gaps[0] == {"us": 150.0, "after": "gemm_b", "before": "adam", "other_streams": ["ncclAllGather"]}
    assert gaps[1]["other_streams"] == ["ncclReduceScatter"]


def test_a_trace_without_gpu_kernels_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="no GPU kernels"):
        step_profile.summarize({"traceEvents": []}, steps=1)
