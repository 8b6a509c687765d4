"""``ds checkpoint``: list the checkpoints in a directory, or export one for Hugging Face.

    ds checkpoint list ckpt/
    ds checkpoint export ckpt/ hf-model/ --tag global_step100 --dtype bf16 --max-shard-size 2GB

Exported weights load with ``transformers``' ``from_pretrained(hf-model/)``. The engine
stores a ``transformers`` model's config in the checkpoint and the export writes it as
``config.json``; for any other model, put its ``config.json`` beside the weights.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from ds.core.checkpoint.export import DEFAULT_MAX_SHARD_BYTES, export_consolidated
from ds.core.checkpoint.format import LATEST_FILE
from ds.core.checkpoint.reader import CheckpointReader, list_tags

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SIZE_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes from ``5GB`` (decimal, as Hugging Face counts), ``1GiB`` (binary) or a plain number."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", text, flags=re.IGNORECASE)
    size = int(float(match[1]) * _SIZE_UNITS[(match[2] or "").upper()]) if match else 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use a positive size such as 5GB, 500MB or 1GiB")
    return size


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="checkpoint_action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list complete checkpoints, oldest first; * marks latest")
    listing.add_argument("directory", help="the directory save_checkpoint wrote to")
    export = actions.add_parser("export", help="write a consolidated Hugging Face safetensors model")
    export.add_argument("directory", help="the directory save_checkpoint wrote to")
    export.add_argument("out_dir", help="where model.safetensors (or its shards and index) go")
    export.add_argument("--tag", help="checkpoint to export (default: the one 'latest' names)")
    export.add_argument("--prefix", default="model/", help="export tensors named PREFIX<name> as <name>")
    export.add_argument("--dtype", choices=sorted(_DTYPES), help="cast floating-point weights")
    export.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=DEFAULT_MAX_SHARD_BYTES,
        help="largest output file before splitting into shards (default 5GB)",
    )


def run(args: argparse.Namespace) -> int:
    if args.checkpoint_action == "list":
        latest_path = Path(args.directory) / LATEST_FILE
        latest = latest_path.read_text().strip() if latest_path.is_file() else None
        for tag in list_tags(args.directory):
            print(f"{'*' if tag == latest else ' '} {tag}")
        return 0
    with CheckpointReader(args.directory, args.tag) as reader:
        written = export_consolidated(
            reader,
            args.out_dir,
            prefix=args.prefix,
            dtype=_DTYPES[args.dtype] if args.dtype else None,
            max_shard_bytes=args.max_shard_size,
        )
    print(f"exported {reader.path} to:")
    for path in written:
        print(f"  {path}")
    return 0
