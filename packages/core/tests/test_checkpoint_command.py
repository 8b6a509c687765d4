"""``ds checkpoint list`` and ``ds checkpoint export`` through their argparse front end."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ds.core.checkpoint import TensorShard, save_checkpoint
from ds.core.checkpoint.command import configure, parse_size, run


def ds_checkpoint(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="ds checkpoint")
    configure(parser)
    return run(parser.parse_args(argv))


def save(directory: Path, tag: str, weight: torch.Tensor) -> None:
    shards = [TensorShard.full("model/w", weight), TensorShard.full("model/b", torch.ones(3))]
    save_checkpoint(directory, tag, shards=shards, metadata={}, rank=0, world_size=1, barrier=lambda: None)


def test_list_marks_latest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save(tmp_path, "step1", torch.zeros(2))
    save(tmp_path, "step2", torch.ones(2))

    assert ds_checkpoint("list", str(tmp_path)) == 0

    assert capsys.readouterr().out.splitlines() == ["  step1", "* step2"]


def test_export_chooses_tag_dtype_and_shard_size(tmp_path: Path) -> None:
    weight = torch.randn(64, 4)
    save(tmp_path / "ckpt", "step1", weight)
    save(tmp_path / "ckpt", "step2", torch.zeros(64, 4))

    code = ds_checkpoint(
        "export",
        str(tmp_path / "ckpt"),
        str(tmp_path / "hf"),
        "--tag",
        "step1",
        "--dtype",
        "bf16",
        "--max-shard-size",
        "0.5KB",
    )

    assert code == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "b": "model-00001-of-00002.safetensors",
        "w": "model-00002-of-00002.safetensors",
    }
    assert torch.equal(load_file(tmp_path / "hf" / "model-00002-of-00002.safetensors")["w"], weight.to(torch.bfloat16))


@pytest.mark.parametrize(("text", "size"), [("5GB", 5 * 10**9), ("500mb", 5 * 10**8), ("1GiB", 2**30), ("4096", 4096)])
def test_sizes_parse_like_hugging_face(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "5 parsecs", "-1GB"])
def test_bad_sizes_are_rejected(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="use a positive size such as 5GB"):
        parse_size(text)
