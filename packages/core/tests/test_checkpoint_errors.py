"""Bad input to the checkpoint layer fails with an error that names the problem and the fix."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ds.core.checkpoint import CheckpointReader, TensorShard, list_tags, save_checkpoint
from ds.core.errors import CheckpointError


def save(directory: Path, tag: str, shards: list[TensorShard], metadata: dict | None = None) -> Path:
    return save_checkpoint(
        directory, tag, shards=shards, metadata=metadata or {}, rank=0, world_size=1, barrier=lambda: None
    )


def good_shards() -> list[TensorShard]:
    return [TensorShard.full("model/w", torch.arange(12.0).reshape(3, 4))]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TensorShard("w", (2, 2), torch.zeros(2, 2), 0), r"2-D .* pass a 1-D slice"),
        (lambda: TensorShard("w", (2, 2), torch.zeros(3), 2), r"covers \[2, 5\) .* only 4 elements"),
        (lambda: TensorShard("w", (2, 2), torch.zeros(1), -1), r"covers \[-1, 0\)"),
        (lambda: TensorShard("", (1,), torch.zeros(1), 0), "non-empty tensor name"),
    ],
)
def test_malformed_shards_are_rejected(make: Callable[[], TensorShard], message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        make()


@pytest.mark.parametrize("tag", ["", "../escape", "a/b", ".hidden", "-flag", "latest"])
def test_tags_that_are_not_plain_folder_names_are_rejected(tmp_path: Path, tag: str) -> None:
    with pytest.raises(CheckpointError, match="invalid checkpoint tag"):
        save(tmp_path, tag, good_shards())
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"opt": {"lr": torch.tensor(0.1)}}, r"checkpoint metadata\['opt'\]\['lr'\] is a Tensor"),
        ({"loss": float("nan")}, r"checkpoint metadata\['loss'\] is nan; JSON has no NaN"),
        ({"by_step": {3: "x"}}, r"checkpoint metadata\['by_step'\] has key 3 of type int"),
    ],
)
def test_metadata_that_json_cannot_round_trip_is_rejected_and_keeps_latest(
    tmp_path: Path, metadata: dict, message: str
) -> None:
    save(tmp_path, "good", good_shards(), {"step": 1})

    with pytest.raises(CheckpointError, match=message):
        save(tmp_path, "bad", good_shards(), metadata)

    assert list_tags(tmp_path) == ["good"]
    assert CheckpointReader(tmp_path).metadata == {"step": 1}
    save(tmp_path, "bad", good_shards(), {"betas": (0.9, 0.99)})
    assert CheckpointReader(tmp_path).metadata == {"betas": [0.9, 0.99]}


def test_inconsistent_shards_are_rejected(tmp_path: Path) -> None:
    flat = torch.arange(12.0)
    twice = [TensorShard("w", (12,), flat[:6], 0), TensorShard("w", (12,), flat[:6], 0)]
    shapes = [TensorShard("w", (12,), flat[:6], 0), TensorShard("w", (3, 4), flat[6:], 6)]
    dtypes = [TensorShard("w", (12,), flat[:6], 0), TensorShard("w", (12,), flat[6:].double(), 6)]

    with pytest.raises(CheckpointError, match="two shards of 'w' at offset 0"):
        save(tmp_path, "t", twice)
    with pytest.raises(
        CheckpointError, match=r"disagree on shape/dtype \(shape \[3, 4\] float32, shape \[12\] float32\)"
    ):
        save(tmp_path, "t", shapes)
    with pytest.raises(CheckpointError, match=r"shape \[12\] float32, shape \[12\] float64"):
        save(tmp_path, "t", dtypes)
    with pytest.raises(CheckpointError, match="rank 2 is outside world size 2"):
        save_checkpoint(tmp_path, "t", shards=[], metadata={}, rank=2, world_size=2, barrier=lambda: None)
    assert list_tags(tmp_path) == []


def test_reader_explains_missing_and_corrupt_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no 'latest' file in .*available tags: \[\]"):
        CheckpointReader(tmp_path)
    save(tmp_path, "one", good_shards())
    save(tmp_path, "two", good_shards())

    with pytest.raises(CheckpointError, match=r"'three' not found.*available tags: \['one', 'two'\]"):
        CheckpointReader(tmp_path, "three")
    (tmp_path / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match=r"latest is corrupt .*available tags: \['one', 'two'\]"):
        CheckpointReader(tmp_path)
    (tmp_path / "one" / "index.json").write_text('{"format_version": 1, "tensors": ')
    with pytest.raises(CheckpointError, match=r"cannot read .*one/index.json"):
        CheckpointReader(tmp_path, "one")
    index = json.loads((tmp_path / "two" / "index.json").read_text())
    (tmp_path / "two" / "index.json").write_text(json.dumps({**index, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99 .* upgrade ds-core"):
        CheckpointReader(tmp_path, "two")
    (tmp_path / "two" / "index.json").write_text(json.dumps(index))
    (tmp_path / "two" / "rank-00000.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: \['rank-00000.safetensors'\] are missing"):
        CheckpointReader(tmp_path, "two")


def test_reader_rejects_unknown_names_and_out_of_range_reads(tmp_path: Path) -> None:
    save(tmp_path, "t", good_shards())
    reader = CheckpointReader(tmp_path)

    with pytest.raises(CheckpointError, match=r"no tensor 'model/W'; did you mean \['model/w'\]"):
        reader.read("model/W")
    with pytest.raises(CheckpointError, match=r"cannot read \[4, 13\) of 'model/w': it has 12 elements"):
        reader.read("model/w", 4, 13)
    with pytest.raises(CheckpointError, match=r"cannot read \[5, 4\)"):
        reader.read("model/w", 5, 4)
