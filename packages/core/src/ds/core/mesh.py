"""The job's processes as named parallel axes over torch's ``DeviceMesh``.

Axes are ``pp`` (pipeline stages), ``dp`` (data parallel), ``sp`` (sequence parallel),
``tp`` (tensor parallel) and ``ep`` (expert parallel). Expert parallelism borrows its
ranks from data parallelism: ``dp = dp_outer x ep``, so a dense parameter is averaged
over all of ``dp`` while an expert, sharded over ``ep``, is averaged over ``dp_outer``
only. ``world_size = pp x dp x sp x tp``.

Rank layout, outermost axis first: ``pp``, ``dp_outer``, ``ep``, ``sp``, ``tp``::

    rank = (((pp_i * dp_outer + dp_outer_i) * ep + ep_i) * sp + sp_i) * tp + tp_i

so ``tp`` ranks are contiguous (one node, for the traffic of every layer), then ``sp``,
then ``ep`` (MoE all-to-all), and ``pp`` is outermost (point-to-point between stages,
the lightest traffic, free to cross nodes). ``dp`` flattens ``(dp_outer, ep)``, so a
rank's dp index is ``dp_outer_i * ep + ep_i``. For 8 ranks with ``tp=2, ep=2``
(``dp=4``, ``dp_outer=2``):

    tp: [0,1] [2,3] [4,5] [6,7]       ep: [0,2] [1,3] [4,6] [5,7]
    dp_outer: [0,4] [1,5] [2,6] [3,7] dp: [0,2,4,6] [1,3,5,7]

Every axis exists even at size 1, so code asks ``mesh.group("tp")`` without checking
whether tensor parallelism is on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ds.core.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from ds.core.comm import Communicator

MESH_DIMS = ("pp", "dp_outer", "ep", "sp", "tp")
"""The device mesh's dimensions, outermost first."""

AXES = ("dp", *MESH_DIMS)
"""Every axis name :class:`Mesh` answers for: the mesh dimensions plus flattened ``dp``."""


@dataclass(frozen=True)
class MeshShape:
    """Axis sizes that multiply to the world size; build with :meth:`resolve`."""

    pp: int
    dp_outer: int
    ep: int
    sp: int
    tp: int

    @classmethod
    def resolve(cls, world_size: int, *, pp: int = 1, tp: int = 1, sp: int = 1, ep: int = 1) -> MeshShape:
        """Derive ``dp`` from the world size; say which arithmetic fails if it does not fit."""
        for name, size in (("pp", pp), ("tp", tp), ("sp", sp), ("ep", ep)):
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ConfigError(f"mesh.{name} must be a positive integer, got {size!r}.")
        model_parallel = pp * tp * sp
        if world_size % model_parallel:
            raise ConfigError(
                f"mesh does not fit world size {world_size}: pp ({pp}) x tp ({tp}) x sp ({sp}) = "
                f"{model_parallel}, which does not divide {world_size}, so dp = {world_size} / "
                f"{model_parallel} is not a whole number. Choose pp, tp and sp whose product "
                f"divides {world_size}, or run on a multiple of {model_parallel} processes."
            )
        dp = world_size // model_parallel
        if dp % ep:
            raise ConfigError(
                f"mesh.ep ({ep}) must divide dp ({dp}), because expert parallelism splits data "
                f"parallelism (dp = dp_outer x ep); dp = world size {world_size} / (pp {pp} x "
                f"tp {tp} x sp {sp}) = {dp}. Choose an ep that divides {dp}: "
                f"{[d for d in range(1, dp + 1) if dp % d == 0]}."
            )
        return cls(pp=pp, dp_outer=dp // ep, ep=ep, sp=sp, tp=tp)

    @property
    def dp(self) -> int:
        return self.dp_outer * self.ep

    @property
    def world_size(self) -> int:
        return math.prod(self.dims)

    @property
    def dims(self) -> tuple[int, ...]:
        """Sizes in :data:`MESH_DIMS` order, the device mesh's shape."""
        return tuple(getattr(self, name) for name in MESH_DIMS)

    def size(self, axis: str) -> int:
        return int(getattr(self, _check_axis(axis)))


class Mesh:
    """Named parallel axes of the job; see the module docstring for the rank layout."""

    def __init__(self, shape: MeshShape, device_mesh: DeviceMesh, dp_mesh: DeviceMesh) -> None:
        self._shape = shape
        self._device_mesh = device_mesh
        # Kept apart because torch deprecates slicing a flattened dim back out of the root.
        self._dp_mesh = dp_mesh

    @classmethod
    def build(cls, comm: Communicator, *, pp: int = 1, tp: int = 1, sp: int = 1, ep: int = 1) -> Mesh:
        """Create the process groups of every axis; a collective call on every rank."""
        shape = MeshShape.resolve(comm.world_size, pp=pp, tp=tp, sp=sp, ep=ep)
        device_mesh = init_device_mesh(comm.device.type, shape.dims, mesh_dim_names=MESH_DIMS)
        dp_mesh = device_mesh["dp_outer", "ep"]._flatten("dp")
        return cls(shape, device_mesh, dp_mesh)

    @property
    def shape(self) -> MeshShape:
        return self._shape

    @property
    def device_mesh(self) -> DeviceMesh:
        """torch's mesh with dims :data:`MESH_DIMS`, for DTensor, FSDP2 and tensor parallel."""
        return self._device_mesh

    @property
    def dp_size(self) -> int:
        return self._shape.dp

    def size(self, axis: str) -> int:
        """How many ranks share this rank's group on ``axis``."""
        return self._shape.size(axis)

    def submesh(self, axis: str) -> DeviceMesh:
        """The 1-D device mesh of this rank's group on ``axis`` (``dp`` included)."""
        return self._dp_mesh if _check_axis(axis) == "dp" else self._device_mesh[axis]

    def rank(self, axis: str) -> int:
        """This rank's index within its group on ``axis``."""
        return self.submesh(axis).get_local_rank()

    def group(self, axis: str) -> ProcessGroup:
        """The process group of this rank's group on ``axis``."""
        return self.submesh(axis).get_group()

    def ranks(self, axis: str) -> list[int]:
        """The global ranks of this rank's group on ``axis``, in group-rank order."""
        return [int(r) for r in self.submesh(axis).mesh.flatten().tolist()]

    def __repr__(self) -> str:
        s = self._shape
        return (
            f"Mesh(world {s.world_size} = pp {s.pp} x dp {s.dp} (dp_outer {s.dp_outer} x ep {s.ep}) "
            f"x sp {s.sp} x tp {s.tp})"
        )


def _check_axis(axis: str) -> str:
    if axis not in AXES:
        raise ConfigError(f"unknown mesh axis {axis!r}; the axes are {', '.join(AXES)}.")
    return axis


__all__ = ["AXES", "MESH_DIMS", "Mesh", "MeshShape"]
