"""A save killed at any moment leaves the previous checkpoint loadable, and the next save works."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import torch

from ds.core.checkpoint import CheckpointReader, TensorShard, list_tags, save_checkpoint


def tensors_of_step(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return {
        "model/w": torch.randn(256, 256, generator=gen),
        "model/b": torch.arange(step, step + 10, dtype=torch.int64),
    }


def save_step(directory: Path | str, tag: str, step: int, barrier: Callable[[], None] = lambda: None) -> None:
    shards = [TensorShard.full(name, tensor) for name, tensor in tensors_of_step(step).items()]
    save_checkpoint(directory, tag, shards=shards, metadata={"step": step}, rank=0, world_size=1, barrier=barrier)


def save_a_then_die_saving(directory: str, second_tag: str, conn: Connection) -> None:
    """Save A completely, then start a second save whose barrier (reached once the rank's
    file is written and fsynced, before anything is renamed) reports and waits to be killed."""
    save_step(directory, "A", 1)

    def announce_and_wait() -> None:
        conn.send("files written")
        time.sleep(600)

    save_step(directory, second_tag, 2, barrier=announce_and_wait)


def save_forever(directory: str, conn: Connection) -> None:
    conn.send("ready")
    step = 0
    while True:
        step += 1
        save_step(directory, ("even", "odd")[step % 2], step)


def start(target: Callable[..., None], *args: object) -> tuple[mp.process.BaseProcess, Connection]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child), daemon=True)
    proc.start()
    return proc, parent


def sigkill(proc: mp.process.BaseProcess) -> None:
    assert proc.pid is not None and proc.is_alive()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL


def assert_holds_step(directory: Path, tag: str | None, step: int) -> None:
    with CheckpointReader(directory, tag) as reader:
        assert reader.metadata == {"step": step}
        for name, tensor in tensors_of_step(step).items():
            assert torch.equal(reader.read_full(name), tensor)


@pytest.mark.parametrize("second_tag", ["B", "A"], ids=["new-tag", "same-tag"])
def test_save_killed_after_writing_files_keeps_previous_checkpoint(tmp_path: Path, second_tag: str) -> None:
    proc, conn = start(save_a_then_die_saving, str(tmp_path), second_tag)
    assert conn.poll(120), "child never reached the barrier of the second save"
    assert conn.recv() == "files written"

    sigkill(proc)

    assert (tmp_path / f".tmp-{second_tag}" / "rank-00000.safetensors").is_file()
    assert (tmp_path / "latest").read_text().strip() == "A"
    assert list_tags(tmp_path) == ["A"]
    assert_holds_step(tmp_path, None, 1)
    save_step(tmp_path, second_tag, 2)
    assert not (tmp_path / f".tmp-{second_tag}").exists()
    assert (tmp_path / "latest").read_text().strip() == second_tag
    assert_holds_step(tmp_path, None, 2)


def test_saves_killed_at_random_moments_always_leave_consistent_checkpoints(tmp_path: Path) -> None:
    delays = random.Random(7)
    for _ in range(3):
        proc, conn = start(save_forever, str(tmp_path))
        assert conn.poll(120) and conn.recv() == "ready"
        time.sleep(delays.uniform(0.05, 0.5))

        sigkill(proc)

        assert list_tags(tmp_path), "no save completed before the kill; lengthen the delay"
        with CheckpointReader(tmp_path) as latest:
            assert_holds_step(tmp_path, None, latest.metadata["step"])
        for tag in list_tags(tmp_path):
            with CheckpointReader(tmp_path, tag) as reader:
                assert_holds_step(tmp_path, tag, reader.metadata["step"])
    save_step(tmp_path, "odd", 1001)
    assert_holds_step(tmp_path, None, 1001)


def test_crash_between_renames_falls_back_to_the_copy_set_aside(tmp_path: Path) -> None:
    save_step(tmp_path, "A", 1)
    # The state a save of A leaves when killed after renaming the old A aside and before
    # renaming the new one in: old copy under .old-A, new complete copy still in .tmp-A.
    os.rename(tmp_path / "A", tmp_path / ".old-A")
    save_step(tmp_path, "scratch", 2)
    os.rename(tmp_path / "scratch", tmp_path / ".tmp-A")
    (tmp_path / "latest").write_text("A\n")

    assert list_tags(tmp_path) == ["A"]
    assert_holds_step(tmp_path, None, 1)

    save_step(tmp_path, "A", 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A", "latest"]
    assert_holds_step(tmp_path, None, 3)
