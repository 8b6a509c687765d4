"""Consolidated export: what Hugging Face loads, from a checkpoint written as uneven slices."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ds.core.checkpoint import CheckpointReader, TensorShard, export_consolidated, save_checkpoint
from ds.core.errors import CheckpointError

MODEL = {
    "embed.weight": torch.randn(16, 8),
    "layers.0.attn.weight": torch.randn(8, 8),
    "layers.0.norm.weight": torch.randn(8).to(torch.bfloat16),
    "layers.1.attn.weight": torch.randn(8, 8),
    "head.bias": torch.randn(16).to(torch.float16),
    "position_ids": torch.arange(32, dtype=torch.int64).reshape(1, 32),
}


@pytest.fixture
def reader(tmp_path: Path) -> Iterator[CheckpointReader]:
    """A 2-rank-style checkpoint: every model tensor split unevenly, plus optimizer and RNG state."""
    shards = []
    for name, tensor in MODEL.items():
        flat, cut = tensor.reshape(-1), tensor.numel() // 3
        shards.append(TensorShard(f"model/{name}", tuple(tensor.shape), flat[:cut], 0))
        shards.append(TensorShard(f"model/{name}", tuple(tensor.shape), flat[cut:], cut))
        shards.append(TensorShard.full(f"optimizer/{name}/exp_avg", torch.zeros_like(tensor, dtype=torch.float32)))
    shards.append(TensorShard.full("rank/00000/rng/torch_cpu", torch.get_rng_state()))
    save_checkpoint(tmp_path / "ckpt", "final", shards=shards, metadata={}, rank=0, world_size=1, barrier=lambda: None)
    with CheckpointReader(tmp_path / "ckpt") as opened:
        yield opened


def test_single_file_export_holds_exactly_the_model_weights(reader: CheckpointReader, tmp_path: Path) -> None:
    written = export_consolidated(reader, tmp_path / "hf")

    assert written == [tmp_path / "hf" / "model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["model.safetensors"]
    loaded = load_file(written[0])
    assert loaded.keys() == MODEL.keys()
    for name, tensor in MODEL.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)
    with safe_open(written[0], framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_dtype_casts_floating_point_tensors_only(reader: CheckpointReader, tmp_path: Path) -> None:
    loaded = load_file(export_consolidated(reader, tmp_path / "hf", dtype=torch.bfloat16)[0])

    assert loaded["embed.weight"].dtype == torch.bfloat16
    assert torch.equal(loaded["embed.weight"], MODEL["embed.weight"].to(torch.bfloat16))
    assert loaded["head.bias"].dtype == torch.bfloat16
    assert loaded["position_ids"].dtype == torch.int64


def test_small_max_shard_bytes_writes_a_correct_sharded_index(reader: CheckpointReader, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    export_consolidated(reader, out)  # a stale single file must not shadow the sharded export
    max_bytes = 300  # embed.weight alone is 512 bytes, so it must get a file of its own

    written = export_consolidated(reader, out, max_shard_bytes=max_bytes)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert len(files) > 2
    assert sorted(p.name for p in out.iterdir()) == [*files, "model.safetensors.index.json"]
    assert sorted(p.name for p in written) == sorted(p.name for p in out.iterdir())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in MODEL.values())
    assert index["weight_map"].keys() == MODEL.keys()
    for file in files:
        loaded = load_file(out / file)
        assert sorted(loaded) == sorted(n for n, f in index["weight_map"].items() if f == file)
        size = sum(t.numel() * t.element_size() for t in loaded.values())
        assert size <= max_bytes or len(loaded) == 1
        for name, tensor in loaded.items():
            assert torch.equal(tensor, MODEL[name])


def test_unknown_prefix_names_the_prefixes_present(reader: CheckpointReader, tmp_path: Path) -> None:
    with pytest.raises(
        CheckpointError, match=r"no tensors under prefix 'weights/'.*\['model/', 'optimizer/', 'rank/'\]"
    ):
        export_consolidated(reader, tmp_path / "hf", prefix="weights/")
