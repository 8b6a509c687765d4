"""The training benchmark (tools/bench/train_llm*.py) end to end on CPU: real torchrun
process groups over gloo, the tiny Llama preset, every ds mode, the suite's records and
tables. DeepSpeed modes need CUDA and are skipped here; speed is judged on the GPU only.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tools" / "bench"
DS_MODES = [
    "ds-zero0",
    "ds-zero1",
    "ds-zero2",
    "ds-zero3",
    "ds-zero2-offload-cpu",
    "ds-zero3-offload-cpu",
    "ds-zero2-offload-nvme",
]
RUN_FIELDS = {
    "tokens_per_s_per_gpu",
    "mfu",
    "peak_memory_gib",
    "host_peak_gib",
    "host_ram_gib",
    "step_s",
    "final_loss",
    "params",
    "matmul_params",
    "micro_batch",
    "grad_accum",
    "gpus",
    "model",
    "mode",
}


@pytest.fixture(scope="module")
def suite() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # the bench scripts import their sibling modules by name, as when run
    try:
        return importlib.import_module("train_llm_suite")
    finally:
        sys.path.remove(str(BENCH))


def run_suite(out: Path, *options: str) -> dict:
    command = [
        sys.executable,
        str(BENCH / "train_llm_suite.py"),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--model",
        "tiny",
        "--warmup",
        "1",
        "--steps",
        "2",
        *options,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "train_llm.json").read_text())


def failure_report(out: Path, record: dict) -> str:
    """A failed run's error and the end of its log, which the record's repr would cut short."""
    log = out / record["log"] if record.get("log") else None
    tail = log.read_text()[-3000:] if log is not None and log.exists() else "(no log)"
    return f"{record['mode']} on {record['gpus']} ranks: {record.get('error')}\n{tail}"


@pytest.mark.slow
def test_every_ds_mode_trains_on_one_and_two_ranks(tmp_path: Path) -> None:
    result = run_suite(
        tmp_path / "out",
        "--gpus",
        "1",
        "2",
        "--modes",
        *DS_MODES,
        "deepspeed-zero3",
        "--grad-accum",
        "2",
        "--activation-checkpointing",
        "--nvme-path",
        str(tmp_path / "nvme"),
    )

    records = result["records"]
    assert [(r["gpus"], r["mode"]) for r in records] == [(g, m) for g in (1, 2) for m in DS_MODES]  # DeepSpeed skipped
    for r in records:
        assert r["status"] == "ok", failure_report(tmp_path / "out", r)
        assert RUN_FIELDS <= r.keys()
        assert r["tokens_per_s_per_gpu"] > 0 and math.isfinite(r["final_loss"])
        assert r["host_peak_gib"] > 0.05 * r["gpus"] and r["host_ram_gib"] > r["host_peak_gib"] / r["gpus"]
        assert (r["micro_batch"], r["grad_accum"], r["activation_checkpointing"]) == (4, 2, True)
        assert r["params"] == records[0]["params"] and r["mfu"] is None and r["peak_memory_gib"] is None
    # ZeRO partitions state, not arithmetic: every mode trains the same model on the same tokens.
    first_steps = {round(r["final_loss"], 2) for r in records if r["gpus"] == 1}
    assert max(first_steps) - min(first_steps) < 0.1
    table = (tmp_path / "out" / "train_llm.md").read_text()
    assert "| 2 | ds-zero3-offload-cpu | tiny | ckpt | 4 | 2 |" in table


@pytest.mark.slow
def test_failing_mode_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    result = run_suite(tmp_path, "--modes", "ds-zero2-offload-nvme", "ds-zero1", "--sweep-micro-batch", "2,3")

    failed, *swept = result["records"]
    assert failed["status"] == "error" and "--nvme-path" in failed["error"] and failed["micro_batch"] == 2
    assert [(r["mode"], r["micro_batch"], r["status"]) for r in swept] == [("ds-zero1", 2, "ok"), ("ds-zero1", 3, "ok")]
    assert swept[1]["log"].endswith("_1gpu_ds-zero1_mb3.log") and (tmp_path / swept[1]["log"]).exists()


def _ok(mode: str, micro_batch: int, tokens: float) -> dict:
    return {
        "gpus": 1,
        "mode": mode,
        "model": "1.3b",
        "micro_batch": micro_batch,
        "grad_accum": 1,
        "status": "ok",
        "tokens_per_s_per_gpu": tokens,
        "mfu": tokens / 1e5,
        "peak_memory_gib": 30.0,
        "host_peak_gib": 4.0,
    }


def test_best_micro_batch_per_mode_and_ratios_against_peers(suite: ModuleType) -> None:
    oom = {"gpus": 1, "mode": "ds-zero3", "micro_batch": 16, "status": "oom", "error": "CUDA out of memory"}
    records = [
        _ok("fsdp2", 4, 30_000.0), _ok("fsdp2", 8, 40_000.0),
        _ok("deepspeed-zero3", 4, 15_000.0),
        _ok("ds-zero3", 4, 33_000.0), _ok("ds-zero3", 8, 45_000.0), oom,
    ]  # fmt: skip

    best = suite.best_runs(records)
    assert best[(1, "ds-zero3", "1.3b")]["micro_batch"] == 8 and best[(1, "fsdp2", "1.3b")]["micro_batch"] == 8
    row = next(line for line in suite.best_table(records).splitlines() if "| ds-zero3 |" in line)
    assert row.endswith("| 3.00x | 1.12x |"), row  # 45k / DeepSpeed's 15k, 45k / FSDP2's best 40k
    assert "| 1 | ds-zero3 |  | eager | 16 |  | oom: CUDA out of memory |" in suite.runs_table(records)
