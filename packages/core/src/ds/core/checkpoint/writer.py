"""Atomic, collective checkpoint saves: a crash at any moment keeps the last good checkpoint.

The protocol, with one ``barrier()`` after the rank files and one at the end:

1. every rank writes ``rank-<r>.safetensors`` into ``<directory>/.tmp-<tag>`` (a name
   derived from the tag alone, so all ranks agree without talking) and fsyncs it; its
   header carries the rank's shard table, so rank 0 gathers the tables through the files;
2. ``barrier()``;
3. rank 0 drops leftovers of a crashed save from the temp folder, proves the slices cover
   every tensor exactly once, writes ``index.json``, renames the temp folder to ``<tag>``
   (an existing ``<tag>`` is first renamed aside and deleted only once the new one is in),
   and writes ``latest`` last, by write-fsync-replace;
4. ``barrier()``; every rank then checks rank 0's outcome on disk.

A rank that fails to write leaves ``rank-<r>.error.json`` instead, and rank 0 leaves
``failure.json`` when it cannot finish, so every rank still reaches both barriers and
raises the same :class:`~ds.core.errors.CheckpointError` instead of hanging. A failed
save leaves its temp folder behind; the next save of that tag replaces it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

import ds.core
from ds.core.checkpoint.format import (
    FORMAT_VERSION,
    INDEX_FILE,
    CheckpointIndex,
    CheckpointLayout,
    ShardRecord,
    ShardRef,
    TensorShard,
    build_tensor_entries,
    check_json_metadata,
    dtype_name,
    rank_file_name,
    shard_key,
)
from ds.core.errors import CheckpointError

_SHARDS_HEADER = "ds.shards"
_RANK_METADATA_HEADER = "ds.rank_metadata"
_FAILURE_FILE = "failure.json"


def save_checkpoint(
    directory: str | os.PathLike[str],
    tag: str,
    *,
    shards: list[TensorShard],
    metadata: Mapping[str, Any],
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
    rank_metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save this rank's ``shards`` as part of checkpoint ``tag``; call on every rank.

    ``metadata`` (rank 0's is kept) and ``rank_metadata`` (kept per rank, e.g. the JSON
    half of :func:`~ds.core.checkpoint.rng_state`) must be JSON-serialisable. Tensors may
    live on any device; each rank's shards are copied to CPU for writing, so a rank needs
    host memory for its own shards. ``barrier`` synchronises all ``world_size`` ranks
    (``torch.distributed.barrier`` or a communicator's). Returns ``<directory>/<tag>``.

    Raises :class:`CheckpointError` on every rank if any rank's input is invalid or the
    slices do not cover each tensor exactly once; the previous checkpoint stays intact.
    """
    layout = CheckpointLayout(Path(directory), tag)
    if not 0 <= rank < world_size:
        raise CheckpointError(f"rank {rank} is outside world size {world_size}")
    local_error: Exception | None = None
    try:
        _write_rank_file(layout, shards, metadata, rank_metadata, rank)
    except Exception as exc:  # noqa: BLE001 - reported to rank 0 so no rank hangs at the barrier
        local_error = exc
        _write_json(layout.temp / _error_file_name(rank), {"rank": rank, "error": _describe(exc)})
    barrier()
    final_error: Exception | None = None
    if rank == 0:
        try:
            if local_error is not None:
                raise CheckpointError(f"rank 0 could not write its file: {_describe(local_error)}")
            _finalize(layout, metadata, world_size)
        except Exception as exc:  # noqa: BLE001 - re-raised below after the closing barrier
            final_error = exc
            _write_json(layout.temp / _FAILURE_FILE, {"error": _describe(exc)})
    barrier()
    if local_error is not None:
        if isinstance(local_error, CheckpointError):
            raise local_error
        raise CheckpointError(
            f"rank {rank} could not write checkpoint {tag!r}: {_describe(local_error)}"
        ) from local_error
    if final_error is not None:
        raise final_error
    failure = layout.temp / _FAILURE_FILE
    if failure.exists():
        reason = json.loads(failure.read_text())["error"]
        raise CheckpointError(f"checkpoint {tag!r} was not saved; rank 0 reported: {reason}")
    if not (layout.final / INDEX_FILE).is_file():
        raise CheckpointError(
            f"checkpoint {tag!r} was not saved: rank 0 did not finish it; do all ranks pass the same directory and tag?"
        )
    return layout.final


def _write_rank_file(
    layout: CheckpointLayout,
    shards: list[TensorShard],
    metadata: Mapping[str, Any],
    rank_metadata: Mapping[str, Any] | None,
    rank: int,
) -> None:
    layout.temp.mkdir(parents=True, exist_ok=True)
    (layout.temp / _error_file_name(rank)).unlink(missing_ok=True)
    check_json_metadata(dict(metadata), "checkpoint metadata")
    check_json_metadata(dict(rank_metadata or {}), "rank metadata")
    tensors = {}
    table: dict[str, dict[str, Any]] = {}
    for shard in shards:
        key = shard_key(shard.name, shard.flat_offset)
        if key in table:
            raise CheckpointError(
                f"rank {rank} passed two shards of {shard.name!r} at offset {shard.flat_offset}; "
                "each slice must be saved once"
            )
        tensors[key] = shard.tensor.detach().to("cpu").contiguous()
        table[key] = {
            "name": shard.name,
            "shape": list(shard.global_shape),
            "dtype": dtype_name(shard.tensor.dtype),
            "flat_offset": shard.flat_offset,
        }
    path = layout.temp / rank_file_name(rank)
    header = {_SHARDS_HEADER: json.dumps(table), _RANK_METADATA_HEADER: json.dumps(rank_metadata or {})}
    save_file(tensors, path, metadata=header)
    _fsync(path)
    _fsync(layout.temp)


def _finalize(layout: CheckpointLayout, metadata: Mapping[str, Any], world_size: int) -> None:
    failed = [
        f"rank {rank}: {json.loads(marker.read_text())['error']}"
        for rank in range(world_size)
        if (marker := layout.temp / _error_file_name(rank)).exists()
    ]
    if failed:
        raise CheckpointError("ranks could not write their checkpoint files:\n  " + "\n  ".join(failed))
    expected = {rank_file_name(rank) for rank in range(world_size)}
    missing = sorted(name for name in expected if not (layout.temp / name).exists())
    if missing:
        raise CheckpointError(
            f"{missing} missing after the barrier: does barrier() synchronise all {world_size} ranks, "
            "and do they all pass the same directory (on a shared file system) and tag?"
        )
    _remove_leftovers(layout.temp, keep=expected)
    records: list[ShardRecord] = []
    rank_metadata: dict[int, dict[str, Any]] = {}
    for rank in range(world_size):
        file_records, meta = _read_rank_header(layout.temp / rank_file_name(rank))
        records.extend(file_records)
        if meta:
            rank_metadata[rank] = meta
    index = CheckpointIndex(
        format_version=FORMAT_VERSION,
        ds_version=ds.core.__version__,
        tag=layout.tag,
        world_size=world_size,
        metadata=dict(metadata),
        rank_metadata=rank_metadata,
        tensors=build_tensor_entries(records),
    )
    _write_json(layout.temp / INDEX_FILE, index.model_dump(mode="json"))
    _fsync(layout.temp)
    _swap_in(layout)
    _write_latest(layout)


def _read_rank_header(path: Path) -> tuple[list[ShardRecord], dict[str, Any]]:
    with safe_open(path, framework="pt") as handle:
        header = handle.metadata() or {}
        numels = {key: handle.get_slice(key).get_shape()[0] for key in handle.keys()}  # noqa: SIM118 - safe_open is not iterable
    if _SHARDS_HEADER not in header:
        raise CheckpointError(f"{path} has no ds shard table; it was not written by save_checkpoint")
    table = json.loads(header[_SHARDS_HEADER])
    records = [
        ShardRecord(
            name=entry["name"],
            shape=tuple(entry["shape"]),
            dtype=entry["dtype"],
            ref=ShardRef(file=path.name, key=key, flat_offset=entry["flat_offset"], numel=numels[key]),
        )
        for key, entry in table.items()
    ]
    return records, json.loads(header[_RANK_METADATA_HEADER])


def _remove_leftovers(folder: Path, keep: set[str]) -> None:
    """Delete what a crashed save of the same tag left: extra ranks' files, old index, markers."""
    for entry in folder.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _swap_in(layout: CheckpointLayout) -> None:
    """Rename the finished temp folder to ``<tag>``, never deleting a copy before its successor is in.

    A crash between the two renames leaves the previous copy complete under ``.old-<tag>``;
    :class:`~ds.core.checkpoint.CheckpointReader` falls back to it.
    """
    if layout.final.exists():
        if layout.aside.exists():
            shutil.rmtree(layout.aside)
        os.rename(layout.final, layout.aside)
    os.rename(layout.temp, layout.final)
    _fsync(layout.directory)
    if layout.aside.exists():
        shutil.rmtree(layout.aside)


def _write_latest(layout: CheckpointLayout) -> None:
    staging = layout.directory / f".{layout.latest.name}.tmp"
    staging.write_text(layout.tag + "\n")
    _fsync(staging)
    os.replace(staging, layout.latest)
    _fsync(layout.directory)


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1) + "\n")
    _fsync(path)


def _error_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.error.json"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _fsync(path: Path) -> None:
    """Flush a file or a directory entry to stable storage; renames are durable only after this."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
