"""ds.core.testing.run_distributed: per-rank results, failures with their rank, and a retry
only for failures of process-group setup (a busy port, a gloo mesh cut while it forms)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from ds.core.testing import DistributedTestFailure, run_distributed


def rank_sum(scale: int) -> tuple[int, float]:
    dist.init_process_group("gloo")
    import torch

    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    return dist.get_rank(), scale * value.item()


def fails_once(folder: str, message: str) -> int:
    """Raises ``message`` on each rank's first attempt (a file per rank and attempt counts them)."""
    import os

    rank = int(os.environ["RANK"])
    attempts = len(list(Path(folder).glob(f"rank{rank}-*")))
    (Path(folder) / f"rank{rank}-{attempts}").touch()
    if attempts == 0:
        raise RuntimeError(message)
    return rank


def test_results_come_back_by_rank() -> None:
    assert run_distributed(rank_sum, 2, 10) == [(0, 30.0), (1, 30.0)]


def test_a_broken_gloo_mesh_is_retried(tmp_path: Path) -> None:
    message = "Gloo connectFullMesh failed with [pair.cc:553] Connection closed by peer [127.0.0.1]:52449"
    assert run_distributed(fails_once, 2, str(tmp_path), message) == [0, 1]
    assert len(list(tmp_path.glob("rank0-*"))) == 2


def test_a_failure_of_the_function_is_not_retried(tmp_path: Path) -> None:
    with pytest.raises(DistributedTestFailure, match=r"(?s)rank \d failed:.*the function's own error"):
        run_distributed(fails_once, 2, str(tmp_path), "the function's own error")
    assert len(list(tmp_path.glob("rank0-*"))) == 1
