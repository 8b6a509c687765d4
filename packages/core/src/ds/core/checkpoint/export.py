"""Consolidate a (sharded, any-layout) checkpoint into a model Hugging Face loads directly.

Output follows ``transformers``' conventions: ``model.safetensors`` when everything fits
in one file, else ``model-00001-of-0000N.safetensors`` files plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map":
{name: file}}``). Files carry the ``{"format": "pt"}`` header ``transformers`` checks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ds.core.checkpoint.reader import CheckpointReader
from ds.core.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def export_consolidated(
    reader: CheckpointReader,
    out_dir: str | os.PathLike[str],
    *,
    prefix: str = "model/",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[Path]:
    """Write every tensor named ``<prefix><name>`` as ``<name>``; return the files written.

    ``dtype`` casts floating-point tensors (integer and bool tensors keep theirs). Output
    files are planned from the index first, so each holds at most ``max_shard_bytes``
    unless one tensor alone is larger (it then gets a file of its own). safetensors writes
    a file from a whole dict, so peak memory is one output file's tensors plus the tensor
    being read and cast: at most ``max_shard_bytes`` + twice the largest tensor. Earlier
    exports' ``model*.safetensors`` files and index in ``out_dir`` are replaced, so a
    stale file can never shadow the new weights.
    """
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    names = [name for name in reader.names() if name.startswith(prefix) and len(name) > len(prefix)]
    if not names:
        roots = sorted({name.split("/", 1)[0] + "/" for name in reader.names()})
        raise CheckpointError(
            f"checkpoint {reader.path} has no tensors under prefix {prefix!r}; its names start with {roots}"
        )
    sizes = {name: reader.numel(name) * _export_dtype(reader.dtype(name), dtype).itemsize for name in names}
    groups = _plan_files(names, sizes, max_shard_bytes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_previous_export(out)
    file_names = (
        [SINGLE_FILE]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    weight_map: dict[str, str] = {}
    for file_name, group in zip(file_names, groups, strict=True):
        tensors = {}
        for name in group:
            tensor = reader.read_full(name)
            tensors[name[len(prefix) :]] = tensor.to(_export_dtype(tensor.dtype, dtype))
            weight_map[name[len(prefix) :]] = file_name
        save_file(tensors, out / file_name, metadata={"format": "pt"})
    written = [out / file_name for file_name in file_names]
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(out / INDEX_FILE)
    return written


def _export_dtype(stored: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    return requested if requested is not None and stored.is_floating_point else stored


def _plan_files(names: list[str], sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Greedy packing in name order, which keeps a layer's tensors together as HF's writer does."""
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        if groups[-1] and used + sizes[name] > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += sizes[name]
    return groups


def _remove_previous_export(out: Path) -> None:
    for path in out.glob("model*.safetensors*"):
        if path.name in (SINGLE_FILE, INDEX_FILE) or (path.name.startswith("model-") and "-of-" in path.name):
            path.unlink()
