"""Multi-rank checkpoint round trips: any slices written by any ranks read back bit-exact."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ds.core.checkpoint import CheckpointReader, TensorShard, list_tags, save_checkpoint
from ds.core.errors import CheckpointError
from ds.core.testing import run_distributed

Plan = dict[int, list[tuple[str, int, int]]]
"""rank -> the (tensor name, start, stop) flat ranges it saves."""


def reference_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return {
        "model/dense.weight": torch.randn(7, 5, generator=gen),
        "model/norm.weight": torch.randn(3, 4, 5, generator=gen).to(torch.bfloat16),
        "model/half": torch.randn(11, generator=gen).to(torch.float16),
        "model/scalar": torch.randn((), generator=gen),
        "model/empty": torch.empty(0, 3),
        "optimizer/dense.weight/step": torch.randint(-(2**62), 2**62, (6, 2), generator=gen, dtype=torch.int64),
    }


def uneven_plan(world_size: int, seed: int) -> Plan:
    """Cut every tensor at random offsets and deal the pieces to random ranks."""
    rng = random.Random(seed)
    plan: Plan = {rank: [] for rank in range(world_size)}
    for name, tensor in reference_tensors().items():
        numel = tensor.numel()
        if numel == 0:
            plan[0].append((name, 0, 0))
            continue
        cuts = sorted({0, numel, *(rng.randrange(1, numel) for _ in range(min(numel - 1, 4)))})
        for start, stop in itertools.pairwise(cuts):
            plan[rng.randrange(world_size)].append((name, start, stop))
    return plan


def even_ranges(numel: int, world_size: int) -> list[tuple[int, int]]:
    """ZeRO-style flat partition: equal chunks, the last ones possibly short or empty."""
    chunk = math.ceil(numel / world_size)
    return [(min(r * chunk, numel), min((r + 1) * chunk, numel)) for r in range(world_size)]


def shards_for(rank: int, plan: Plan) -> list[TensorShard]:
    tensors = reference_tensors()
    return [
        TensorShard(name, tuple(tensors[name].shape), tensors[name].reshape(-1)[start:stop], start)
        for name, start, stop in plan[rank]
    ]


def save_on_ranks(directory: str, tag: str, plan: Plan) -> str:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    path = save_checkpoint(
        directory,
        tag,
        shards=shards_for(rank, plan),
        metadata={"step": 7, "betas": [0.9, 0.999], "note": "written by rank 0"},
        rank_metadata={"rank": rank},
        rank=rank,
        world_size=world_size,
        barrier=dist.barrier,
    )
    return str(path)


def read_own_ranges(directory: str) -> dict[str, torch.Tensor]:
    """What a rank of a new, smaller job reads: its even share of every tensor."""
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    with CheckpointReader(directory) as reader:
        return {name: reader.read(name, *even_ranges(reader.numel(name), world_size)[rank]) for name in reader.names()}


def save_expecting_error(directory: str, tags: list[str], plan: Plan, rank_metadata: dict) -> str:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        save_checkpoint(
            directory,
            tags[rank],
            shards=shards_for(rank, plan),
            metadata={},
            rank_metadata=rank_metadata if rank == 1 else None,
            rank=rank,
            world_size=world_size,
            barrier=dist.barrier,
        )
    except CheckpointError as exc:
        return str(exc)
    raise AssertionError(f"rank {rank} saved {tags[rank]} without error")


def assert_bit_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert torch.equal(actual.view(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("world_size", [2, 4])
def test_uneven_slices_from_many_ranks_read_back_whole_and_by_any_range(tmp_path: Path, world_size: int) -> None:
    plan = uneven_plan(world_size, seed=world_size)
    paths = run_distributed(save_on_ranks, world_size, str(tmp_path), "step7", plan)

    assert paths == [str(tmp_path / "step7")] * world_size
    assert (tmp_path / "latest").read_text().strip() == "step7"
    assert list_tags(tmp_path) == ["step7"]
    expected = reference_tensors()
    rng = random.Random(0)
    with CheckpointReader(tmp_path) as reader:
        assert reader.tag == "step7"
        assert reader.world_size == world_size
        assert reader.metadata == {"step": 7, "betas": [0.9, 0.999], "note": "written by rank 0"}
        assert [reader.rank_metadata(r) for r in range(world_size)] == [{"rank": r} for r in range(world_size)]
        assert sorted(reader.names()) == sorted(expected)
        for name, tensor in expected.items():
            assert reader.global_shape(name) == tuple(tensor.shape)
            assert reader.dtype(name) == tensor.dtype
            assert_bit_exact(reader.read_full(name), tensor)
            for _ in range(10):
                start = rng.randint(0, tensor.numel())
                stop = rng.randint(start, tensor.numel())
                assert_bit_exact(reader.read(name, start, stop), tensor.reshape(-1)[start:stop])


def test_checkpoint_of_four_ranks_loads_as_two_ranks_slices(tmp_path: Path) -> None:
    run_distributed(save_on_ranks, 4, str(tmp_path), "four", uneven_plan(4, seed=11))

    per_rank = run_distributed(read_own_ranges, 2, str(tmp_path))

    for name, tensor in reference_tensors().items():
        assert_bit_exact(torch.cat([per_rank[0][name], per_rank[1][name]]), tensor.reshape(-1))


def test_gaps_overlaps_bad_metadata_and_mismatched_tags_fail_on_every_rank(tmp_path: Path) -> None:
    good = uneven_plan(2, seed=5)
    run_distributed(save_on_ranks, 2, str(tmp_path), "good", good)
    gap = {0: [("model/dense.weight", 0, 10)], 1: [("model/dense.weight", 12, 35)]}
    overlap = {0: [("model/dense.weight", 0, 20)], 1: [("model/dense.weight", 15, 35)]}
    bad = ["bad", "bad"]

    gap_errors = run_distributed(save_expecting_error, 2, str(tmp_path), bad, gap, {})
    overlap_errors = run_distributed(save_expecting_error, 2, str(tmp_path), bad, overlap, {})
    metadata_errors = run_distributed(save_expecting_error, 2, str(tmp_path), bad, good, {"lr": torch.ones(1)})
    mismatch_errors = run_distributed(save_expecting_error, 2, str(tmp_path / "new"), ["bad", "other"], good, {})

    assert all("'model/dense.weight': gap, elements [10, 12) are in no shard" in e for e in gap_errors)
    assert all(
        "'model/dense.weight': overlap, elements [15, 20) are in both rank-00000.safetensors and rank-00001" in e
        for e in overlap_errors
    )
    assert all("rank metadata['lr'] is a Tensor" in e for e in metadata_errors)
    assert "['rank-00001.safetensors'] missing after the barrier" in mismatch_errors[0]
    assert "do all ranks pass the same directory and tag?" in mismatch_errors[1]
    assert list_tags(tmp_path) == ["good"]
    assert (tmp_path / "latest").read_text().strip() == "good"
    with CheckpointReader(tmp_path) as reader:
        for name, tensor in reference_tensors().items():
            assert_bit_exact(reader.read_full(name), tensor)


def test_reads_are_copies_the_caller_may_modify(tmp_path: Path) -> None:
    plan = {0: [(name, 0, t.numel()) for name, t in reference_tensors().items()]}
    save_checkpoint(tmp_path, "t", shards=shards_for(0, plan), metadata={}, rank=0, world_size=1, barrier=lambda: None)
    expected = reference_tensors()["model/dense.weight"]

    with CheckpointReader(tmp_path) as reader:
        reader.read("model/dense.weight", 2, 9).add_(1.0)
        reader.read_full("model/dense.weight").zero_()

        assert_bit_exact(reader.read_full("model/dense.weight"), expected)


def test_checkpoint_holds_only_safetensors_and_json(tmp_path: Path) -> None:
    plan = {0: [(name, 0, t.numel()) for name, t in reference_tensors().items()]}
    for tag in ("a", "b", "a"):
        save_checkpoint(
            tmp_path, tag, shards=shards_for(0, plan), metadata={}, rank=0, world_size=1, barrier=lambda: None
        )

    files = [p for p in tmp_path.rglob("*") if p.is_file()]

    assert sorted(str(p.relative_to(tmp_path)) for p in files) == [
        "a/index.json",
        "a/rank-00000.safetensors",
        "b/index.json",
        "b/rank-00000.safetensors",
        "latest",
    ]
    assert list_tags(tmp_path) == ["b", "a"]
