"""Mesh axes hold the documented ranks (tp contiguous, ep inside dp, pp outermost), work
at size 1, and shapes that do not fit the world size fail with the arithmetic."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from ds.core.comm import init_distributed
from ds.core.errors import ConfigError
from ds.core.mesh import AXES, Mesh, MeshShape
from ds.core.testing import run_distributed

LAYOUTS: dict[str, dict[str, int]] = {
    "dp only": {},
    "tp=2": {"tp": 2},
    "ep=2": {"ep": 2},
    "pp=2 tp=2": {"pp": 2, "tp": 2},
    "sp=2 ep=2": {"sp": 2, "ep": 2},
}


def _describe_meshes() -> dict[str, Any]:
    comm = init_distributed(timeout_seconds=60)
    described: dict[str, Any] = {}
    for name, sizes in LAYOUTS.items():
        mesh = Mesh.build(comm, **sizes)
        summed = {}
        for axis in AXES:
            assert dist.get_process_group_ranks(mesh.group(axis)) == mesh.ranks(axis)
            assert mesh.ranks(axis)[mesh.rank(axis)] == comm.rank
            value = torch.tensor([float(comm.rank)])
            comm.all_reduce(value, group=mesh.group(axis))
            summed[axis] = value.item()
        described[name] = {
            "ranks": {axis: mesh.ranks(axis) for axis in AXES},
            "sizes": {axis: mesh.size(axis) for axis in AXES},
            "dp_size": mesh.dp_size,
            "summed": summed,
            "device_mesh": (mesh.device_mesh.mesh_dim_names, tuple(mesh.device_mesh.shape)),
        }
    comm.destroy()
    return described


# Expected group of every rank 0..3 per axis, from the documented layout
# rank = (((pp_i * dp_outer + dp_outer_i) * ep + ep_i) * sp + sp_i) * tp + tp_i.
EXPECTED_GROUPS: dict[str, dict[str, list[list[int]]]] = {
    "dp only": {"dp": [[0, 1, 2, 3]], "dp_outer": [[0, 1, 2, 3]], "tp": [[0], [1], [2], [3]]},
    "tp=2": {"tp": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]], "pp": [[0], [1], [2], [3]]},
    "ep=2": {"ep": [[0, 1], [2, 3]], "dp_outer": [[0, 2], [1, 3]], "dp": [[0, 1, 2, 3]]},
    "pp=2 tp=2": {"pp": [[0, 2], [1, 3]], "tp": [[0, 1], [2, 3]], "dp": [[0], [1], [2], [3]]},
    "sp=2 ep=2": {"sp": [[0, 1], [2, 3]], "ep": [[0, 2], [1, 3]], "dp": [[0, 2], [1, 3]],
                  "dp_outer": [[0], [1], [2], [3]]},
}


def test_axis_groups_follow_the_documented_layout_on_four_ranks() -> None:
    results = run_distributed(_describe_meshes, 4)
    for name, expected in EXPECTED_GROUPS.items():
        for rank, described in enumerate(results):
            mesh = described[name]
            for axis, groups in expected.items():
                (own,) = [g for g in groups if rank in g]
                assert mesh["ranks"][axis] == own, (name, axis, rank)
            for axis in AXES:
                assert mesh["sizes"][axis] == len(mesh["ranks"][axis]), (name, axis)
                assert mesh["summed"][axis] == sum(mesh["ranks"][axis]), (name, axis)
            assert mesh["dp_size"] == mesh["sizes"]["dp"] == mesh["sizes"]["dp_outer"] * mesh["sizes"]["ep"]
            shape = tuple(mesh["sizes"][a] for a in ("pp", "dp_outer", "ep", "sp", "tp"))
            assert mesh["device_mesh"] == (("pp", "dp_outer", "ep", "sp", "tp"), shape)


def test_shape_derives_dp_and_ep_splits_it() -> None:
    shape = MeshShape.resolve(16, pp=2, tp=2, ep=2)
    assert (shape.dp, shape.dp_outer, shape.ep, shape.world_size) == (4, 2, 2, 16)
    assert shape.dims == (2, 2, 2, 1, 2)
    assert [shape.size(a) for a in AXES] == [4, 2, 2, 2, 1, 2]


@pytest.mark.parametrize(
    ("world", "sizes", "message"),
    [
        (6, {"tp": 4}, r"pp \(1\) x tp \(4\) x sp \(1\) = 4, which does not divide 6, so dp = 6 / 4"),
        (8, {"pp": 2, "ep": 3}, r"mesh.ep \(3\) must divide dp \(4\).*8 / \(pp 2 x tp 1 x sp 1\) = 4"),
        (4, {"tp": 0}, r"mesh.tp must be a positive integer, got 0"),
    ],
)
def test_shapes_that_do_not_fit_show_the_arithmetic(world: int, sizes: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MeshShape.resolve(world, **sizes)


def test_unknown_axis_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="unknown mesh axis 'dq'; the axes are dp, pp, dp_outer, ep, sp, tp"):
        MeshShape.resolve(4).size("dq")
