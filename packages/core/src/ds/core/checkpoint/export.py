"""Consolidate a (sharded, any-layout) checkpoint into a model Hugging Face loads directly.

Output follows ``transformers``' conventions: ``model.safetensors`` when everything fits
in one file, else ``model-00001-of-0000N.safetensors`` files plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map":
{name: file}}``). Files carry the ``{"format": "pt"}`` header ``transformers`` checks.
When the checkpoint's metadata holds the model's Hugging Face config (the engine stores
it under ``hf_config`` whenever the model has a ``transformers`` config), it becomes
``config.json``, so ``from_pretrained(out_dir)`` needs nothing else.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from ds.core.checkpoint.reader import CheckpointReader
from ds.core.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
HF_CONFIG_KEY = "hf_config"
CHUNK_BYTES = 64 * 2**20
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16",
    torch.uint8: "U8", torch.bool: "BOOL",
}


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
    unless one tensor alone is larger (it then gets a file of its own). Files are streamed:
    each header is computed from the index and each tensor copied in ranges of
    ``CHUNK_BYTES``, so memory stays a few chunks whatever the model, tensor or file size
    (``safetensors.save_file`` would need a whole file's tensors in memory). Earlier
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
        _write_safetensors(out / file_name, reader, {name: name[len(prefix) :] for name in group}, dtype)
        weight_map.update({name[len(prefix) :]: file_name for name in group})
    written = [out / file_name for file_name in file_names]
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(out / INDEX_FILE)
    hf_config = reader.metadata.get(HF_CONFIG_KEY)
    if hf_config is not None:
        (out / CONFIG_FILE).write_text(json.dumps(_with_dtype(hf_config, dtype), indent=2, sort_keys=True) + "\n")
        written.append(out / CONFIG_FILE)
    return written


def _write_safetensors(
    path: Path, reader: CheckpointReader, renamed: dict[str, str], dtype: torch.dtype | None
) -> None:
    """One safetensors file holding ``renamed``'s tensors, written range by range.

    The format is an 8-byte little-endian header length, a JSON header giving each
    tensor's dtype, shape and byte range (padded to 8 bytes), then the bytes in that
    order; tensors are written in the host's byte order, little-endian on every platform
    torch supports.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, key in renamed.items():
        out_dtype = _export_dtype(reader.dtype(name), dtype)
        if out_dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"cannot export {name!r}: safetensors has no dtype {out_dtype}")
        stop = offset + reader.numel(name) * out_dtype.itemsize
        header[key] = {"dtype": _SAFETENSORS_DTYPES[out_dtype], "shape": list(reader.global_shape(name)),
                       "data_offsets": [offset, stop]}
        offset = stop
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for name in renamed:
            out_dtype = _export_dtype(reader.dtype(name), dtype)
            numel = reader.numel(name)
            step = max(1, CHUNK_BYTES // max(reader.dtype(name).itemsize, out_dtype.itemsize))
            for start in range(0, numel, step):
                piece = reader.read(name, start, min(start + step, numel)).to(out_dtype)
                file.write(piece.view(torch.uint8).numpy().data)


def _with_dtype(hf_config: dict[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
    """The config with its dtype entry (``dtype``, or ``torch_dtype`` before transformers 5)
    naming the exported dtype, which ``from_pretrained``'s default ``dtype="auto"`` loads."""
    if dtype is None:
        return hf_config
    name = str(dtype).removeprefix("torch.")
    return {**hf_config, **{key: name for key in ("dtype", "torch_dtype") if key in hf_config}}


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
