"""ds.core.testing.run_distributed: per-rank results, failures with their rank, and a retry
only for failures of process-group setup (a busy port, a gloo mesh cut while it forms)."""

from __future__ import annotations

import os
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


def fails_on_first_attempt(folder: str, message: str) -> int:
    """Raises ``message`` in the first attempt only, and leaves a file per attempt that ran.

    An attempt is named by its rendezvous port (each attempt takes a new one). The first
    rank to start writes the port of the first attempt to ``first-port``; a rank the harness
    killed before it got there leaves no trace, so the test counts attempts, not ranks.
    """
    port = os.environ["MASTER_PORT"]
    (Path(folder) / f"attempt-{port}").touch()
    try:
        with open(Path(folder) / "first-port", "x") as first:
            first.write(port)
    except FileExistsError:
        pass
    # Empty: the other rank of the first attempt has created the file and not yet written it.
    if (Path(folder) / "first-port").read_text() in ("", port):
        raise RuntimeError(message)
    return int(os.environ["RANK"])


def always_fails(folder: str, message: str) -> int:
    (Path(folder) / f"attempt-{os.environ['MASTER_PORT']}").touch()
    raise RuntimeError(message)


def attempts(folder: Path) -> int:
    return len(list(folder.glob("attempt-*")))


def test_results_come_back_by_rank() -> None:
    assert run_distributed(rank_sum, 2, 10) == [(0, 30.0), (1, 30.0)]


def test_a_broken_gloo_mesh_is_retried(tmp_path: Path) -> None:
    message = "Gloo connectFullMesh failed with [pair.cc:553] Connection closed by peer [127.0.0.1]:52449"
    assert run_distributed(fails_on_first_attempt, 2, str(tmp_path), message) == [0, 1]
    assert attempts(tmp_path) == 2


def test_a_failure_of_the_function_is_not_retried(tmp_path: Path) -> None:
    with pytest.raises(DistributedTestFailure, match=r"(?s)rank \d failed:.*the function's own error"):
        run_distributed(always_fails, 2, str(tmp_path), "the function's own error")
    assert attempts(tmp_path) == 1


def environment_variable(name: str) -> str | None:
    return os.environ.get(name)


def test_ranks_see_the_callers_environment_at_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # The ranks fork from a server started by the first call; a variable set after it must still arrive.
    assert run_distributed(environment_variable, 2, "DS_HARNESS_PROBE") == [None, None]
    monkeypatch.setenv("DS_HARNESS_PROBE", "set after the first call")
    assert run_distributed(environment_variable, 2, "DS_HARNESS_PROBE") == ["set after the first call"] * 2
