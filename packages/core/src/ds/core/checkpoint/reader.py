"""Read any range of any tensor of a checkpoint, whatever layout wrote it.

A rank loading under a new world size or ZeRO stage asks for exactly the flat range it
will own; :meth:`CheckpointReader.read` finds the slices that overlap it and reads only
those bytes (safetensors' ``get_slice`` over a memory map), so no rank ever materialises
a whole model it does not need.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

import pydantic
import torch
from safetensors import safe_open

from ds.core.checkpoint.format import (
    ASIDE_PREFIX,
    FORMAT_VERSION,
    INDEX_FILE,
    LATEST_FILE,
    CheckpointIndex,
    CheckpointLayout,
    TensorEntry,
    validate_tag,
)
from ds.core.errors import CheckpointError


def list_tags(directory: str | os.PathLike[str]) -> list[str]:
    """Complete checkpoints in ``directory``, oldest save first (by their index's mtime).

    Includes a tag whose save crashed while replacing it, since the reader falls back to
    the previous copy the save had set aside.
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    saved: dict[str, int] = {}
    for entry in root.iterdir():
        tag = entry.name.removeprefix(ASIDE_PREFIX)
        if tag.startswith(".") or not (index := entry / INDEX_FILE).is_file():
            continue
        saved[tag] = max(saved.get(tag, 0), index.stat().st_mtime_ns)
    return sorted(saved, key=lambda tag: (saved[tag], tag))


class CheckpointReader:
    """One checkpoint tag, opened for reading; ``tag=None`` reads the one ``latest`` names.

    Rank files are opened lazily and kept open; use the reader as a context manager or
    call :meth:`close` to release them.
    """

    def __init__(self, directory: str | os.PathLike[str], tag: str | None = None) -> None:
        self.directory = Path(directory)
        self.tag = _read_latest(self.directory) if tag is None else validate_tag(tag)
        self.path = _tag_folder(self.directory, self.tag)
        self._index = _load_index(self.path / INDEX_FILE)
        missing = sorted(
            {ref.file for entry in self._index.tensors.values() for ref in entry.shards}
            - {p.name for p in self.path.iterdir()}
        )
        if missing:
            raise CheckpointError(f"checkpoint {self.path} is incomplete: {missing} are missing")
        self._handles: dict[str, Any] = {}

    # -- what the checkpoint holds ------------------------------------------------------

    @property
    def metadata(self) -> dict[str, Any]:
        """The ``metadata`` rank 0 passed to :func:`~ds.core.checkpoint.save_checkpoint`."""
        return self._index.metadata

    def rank_metadata(self, rank: int) -> dict[str, Any]:
        """The ``rank_metadata`` rank ``rank`` passed when saving; empty if it passed none."""
        return self._index.rank_metadata.get(rank, {})

    @property
    def world_size(self) -> int:
        """How many ranks wrote this checkpoint (not how many may read it)."""
        return self._index.world_size

    def names(self) -> list[str]:
        """Every tensor name, sorted."""
        return list(self._index.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._index.tensors

    def global_shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).torch_dtype

    def numel(self, name: str) -> int:
        return self._entry(name).numel

    # -- reading ------------------------------------------------------------------------

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor, as a new 1-D CPU tensor.

        The result is always a copy: safetensors' slices are views of a memory map that
        the open file shares between reads, so handing one out would let a caller's
        in-place update change what the next read returns.
        """
        entry = self._entry(name)
        stop = entry.numel if stop is None else stop
        if not 0 <= start <= stop <= entry.numel:
            raise CheckpointError(f"cannot read [{start}, {stop}) of {name!r}: it has {entry.numel} elements")
        out = torch.empty(stop - start, dtype=entry.torch_dtype)
        filled = start
        for ref in entry.shards:
            lo, hi = max(filled, ref.flat_offset), min(stop, ref.stop)
            if lo >= hi:
                continue
            if lo > filled:
                break
            piece = self._handle(ref.file).get_slice(ref.key)[lo - ref.flat_offset : hi - ref.flat_offset]
            out[lo - start : hi - start] = piece
            filled = hi
        if filled < stop:
            raise CheckpointError(
                f"{self.path / INDEX_FILE} lists no shard for elements [{filled}, {stop}) of {name!r}; "
                "the index is corrupt"
            )
        return out

    def read_full(self, name: str) -> torch.Tensor:
        """The whole tensor in its global shape."""
        return self.read(name).reshape(self._entry(name).shape)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self._index.tensors[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._index.tensors, n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise CheckpointError(f"checkpoint {self.path} has no tensor {name!r}{hint}") from None

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            self._handles[file] = safe_open(self.path / file, framework="pt")
        return self._handles[file]


def _read_latest(directory: Path) -> str:
    latest = directory / LATEST_FILE
    if not latest.is_file():
        raise CheckpointError(
            f"no {LATEST_FILE!r} file in {directory}; available tags: {list_tags(directory)}. Pass tag= to choose one."
        )
    tag = latest.read_text().strip()
    try:
        return validate_tag(tag)
    except CheckpointError:
        raise CheckpointError(
            f"{latest} is corrupt (it holds {tag[:80]!r}); available tags: {list_tags(directory)}. "
            "Pass tag= to choose one."
        ) from None


def _tag_folder(directory: Path, tag: str) -> Path:
    """The tag's folder, or the copy a save crashed while replacing it left aside."""
    layout = CheckpointLayout(directory, tag)
    for folder in (layout.final, layout.aside):
        if (folder / INDEX_FILE).is_file():
            return folder
    raise CheckpointError(
        f"checkpoint {tag!r} not found: {layout.final / INDEX_FILE} does not exist; "
        f"available tags: {list_tags(directory)}"
    )


def _load_index(path: Path) -> CheckpointIndex:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {version} (written by ds {raw.get('ds_version')}); this ds "
            f"reads up to version {FORMAT_VERSION}: upgrade ds-core"
        )
    try:
        return CheckpointIndex.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from exc
