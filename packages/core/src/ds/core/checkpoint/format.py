"""The on-disk layout of a ds checkpoint and the index that describes it.

A checkpoint directory holds one folder per tag and a ``latest`` file naming the newest
complete one::

    <directory>/latest                        text: the newest complete tag
    <directory>/<tag>/index.json              what every tensor is and where its bytes are
    <directory>/<tag>/rank-00000.safetensors  one file per writing rank

Every tensor is stored as 1-D slices of its flattened form. Any rank may hold any
slices (ZeRO's flat partitions cut tensors at arbitrary offsets); together the slices
cover each tensor exactly once. Recording slices by flat offset rather than by the
writer's layout is what makes a checkpoint *universal*: a reader under another world
size, parallel layout or ZeRO stage asks for the range it owns and gets it stitched from
whichever files hold it. Tensors live in safetensors and metadata in JSON, so loading a
checkpoint never unpickles anything and cannot run code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ds.core.errors import CheckpointError

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
LATEST_FILE = "latest"
TEMP_PREFIX = ".tmp-"
ASIDE_PREFIX = ".old-"
_TAG_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,199}")


def rank_file_name(rank: int) -> str:
    """The safetensors file one rank writes; zero-padded so listings sort by rank."""
    return f"rank-{rank:05d}.safetensors"


def shard_key(name: str, flat_offset: int) -> str:
    """Key of one slice inside a rank file; a rank may hold several slices of one tensor."""
    return f"{name}@{flat_offset}"


def validate_tag(tag: str) -> str:
    """Tags become folder names next to hidden temp folders and ``latest``; keep them plain."""
    if not isinstance(tag, str) or not _TAG_PATTERN.fullmatch(tag) or tag == LATEST_FILE:
        raise CheckpointError(
            f"invalid checkpoint tag {tag!r}: use 1-200 letters, digits or '_.+=-', not "
            f"starting with '.' or '-' and not {LATEST_FILE!r} (for example 'global_step100')"
        )
    return tag


@dataclass(frozen=True)
class CheckpointLayout:
    """Paths of one tag's save. Every rank derives the same temp folder from the tag alone,
    so no rank has to tell the others where to write, and a save that crashed leaves its
    temp folder where the next save of that tag finds and replaces it."""

    directory: Path
    tag: str

    def __post_init__(self) -> None:
        validate_tag(self.tag)

    @property
    def final(self) -> Path:
        return self.directory / self.tag

    @property
    def temp(self) -> Path:
        return self.directory / f"{TEMP_PREFIX}{self.tag}"

    @property
    def aside(self) -> Path:
        """Where the previous copy of a re-saved tag waits while the new one is renamed in."""
        return self.directory / f"{ASIDE_PREFIX}{self.tag}"

    @property
    def latest(self) -> Path:
        return self.directory / LATEST_FILE


@dataclass(frozen=True, eq=False)
class TensorShard:
    """The slice ``[flat_offset, flat_offset + numel)`` of a tensor's flattened form.

    ``tensor`` holds the slice as a 1-D tensor on any device; ``global_shape`` is the
    shape of the whole tensor, which every shard of the same ``name`` must agree on.
    Per-rank private state (RNG states differ per rank) uses names that embed the rank,
    for example ``rank/00001/rng/torch_cpu``. Shards compare by identity: comparing
    tensors elementwise has no single truth value.
    """

    name: str
    global_shape: tuple[int, ...]
    tensor: torch.Tensor
    flat_offset: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_shape", tuple(int(d) for d in self.global_shape))
        object.__setattr__(self, "flat_offset", int(self.flat_offset))
        if not self.name:
            raise CheckpointError("a checkpoint shard needs a non-empty tensor name")
        if self.tensor.dim() != 1:
            raise CheckpointError(
                f"shard of {self.name!r} is {self.tensor.dim()}-D with shape {tuple(self.tensor.shape)}; "
                "pass a 1-D slice of the flattened tensor, e.g. tensor.reshape(-1)[start:stop]"
            )
        total = self.global_numel
        if self.flat_offset < 0 or self.flat_offset + self.numel > total:
            raise CheckpointError(
                f"shard of {self.name!r} covers [{self.flat_offset}, {self.flat_offset + self.numel}) "
                f"but the tensor of shape {self.global_shape} has only {total} elements"
            )

    @classmethod
    def full(cls, name: str, tensor: torch.Tensor) -> TensorShard:
        """One shard holding the whole of ``tensor``."""
        return cls(name, tuple(tensor.shape), tensor.detach().reshape(-1), 0)

    @property
    def numel(self) -> int:
        return self.tensor.numel()

    @property
    def global_numel(self) -> int:
        return math.prod(self.global_shape)


class ShardRef(BaseModel):
    """Where one slice of a tensor is: a key in one rank file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    file: str
    key: str
    flat_offset: int = Field(ge=0)
    numel: int = Field(ge=0)

    @property
    def stop(self) -> int:
        return self.flat_offset + self.numel


class TensorEntry(BaseModel):
    """A tensor's global shape, dtype name (as in ``torch.<dtype>``) and slices by offset."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shape: tuple[int, ...]
    dtype: str
    shards: list[ShardRef]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)


class CheckpointIndex(BaseModel):
    """The contents of ``index.json``."""

    model_config = ConfigDict(extra="forbid")

    format_version: int
    ds_version: str
    tag: str
    world_size: int
    metadata: dict[str, Any]
    rank_metadata: dict[int, dict[str, Any]] = Field(default_factory=dict)
    tensors: dict[str, TensorEntry]


@dataclass(frozen=True)
class ShardRecord:
    """One slice as the rank that wrote it describes it in its file's header."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    ref: ShardRef


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in checkpoint index; was it written by a newer ds?")
    return dtype


def build_tensor_entries(records: Iterable[ShardRecord]) -> dict[str, TensorEntry]:
    """Merge every rank's slices into one entry per tensor, proving exact coverage.

    Raises :class:`CheckpointError` listing every tensor whose slices disagree on shape
    or dtype, leave gaps, or overlap, so a wrong partitioner fails at save time instead
    of producing a checkpoint that silently loads garbage.
    """
    by_name: dict[str, list[ShardRecord]] = {}
    for record in records:
        by_name.setdefault(record.name, []).append(record)
    problems: list[str] = []
    entries: dict[str, TensorEntry] = {}
    for name in sorted(by_name):
        group = by_name[name]
        kinds = {(r.shape, r.dtype) for r in group}
        if len(kinds) > 1:
            seen = ", ".join(f"shape {list(s)} {d}" for s, d in sorted(kinds))
            problems.append(f"{name!r}: shards disagree on shape/dtype ({seen})")
            continue
        shape, dtype = kinds.pop()
        refs = sorted((r.ref for r in group), key=lambda ref: (ref.flat_offset, ref.numel))
        problems.extend(_coverage_problems(name, math.prod(shape), refs))
        entries[name] = TensorEntry(shape=shape, dtype=dtype, shards=refs)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(
            f"checkpoint slices must cover every tensor exactly once; the partitioner produced:\n  {shown}{more}"
        )
    return entries


def _coverage_problems(name: str, total: int, refs: list[ShardRef]) -> list[str]:
    problems = []
    covered = 0
    last_file = ""
    for ref in refs:
        if ref.numel == 0:
            continue
        if ref.flat_offset > covered:
            problems.append(f"{name!r}: gap, elements [{covered}, {ref.flat_offset}) are in no shard")
        elif ref.flat_offset < covered:
            problems.append(
                f"{name!r}: overlap, elements [{ref.flat_offset}, {min(covered, ref.stop)}) "
                f"are in both {last_file} and {ref.file}"
            )
        if ref.stop > covered:
            covered, last_file = ref.stop, ref.file
    if covered < total:
        problems.append(f"{name!r}: gap, elements [{covered}, {total}) are in no shard")
    return problems


def check_json_metadata(value: Any, what: str) -> None:
    """Reject anything JSON would not round-trip, naming the offending path.

    Tuples are accepted and come back as lists.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CheckpointError(f"{what} is {value}; JSON has no NaN or infinity, store it as a string")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{what} has key {key!r} of type {type(key).__name__}; JSON keys must be str")
            check_json_metadata(item, f"{what}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_json_metadata(item, f"{what}[{i}]")
        return
    raise CheckpointError(
        f"{what} is a {type(value).__name__}, which is not JSON-serialisable; checkpoint metadata "
        "may hold only dict/list/str/int/float/bool/None (pass tensors as shards instead)"
    )
