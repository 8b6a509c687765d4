"""``ds config check FILE [--world-size N]``: validate a config and print what it resolves to.

The resolved config (JSON, every default and ``"auto"`` filled in) goes to stdout, so it
can be piped; warnings and errors go to stderr as one line each, without a traceback.
Exit status: 0 valid, 1 invalid, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from ds.core.config.build import load_config
from ds.core.errors import DsError

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``check`` subcommand to the ``ds config`` parser."""
    commands = parser.add_subparsers(dest="config_command", metavar="COMMAND")
    check = commands.add_parser(
        "check",
        help="validate a config file and print it resolved",
        description="Validate a DeepSpeed-format config (JSON or YAML) as ds reads it and print "
                    "the resolved config as JSON.",
    )
    check.add_argument("file", metavar="FILE", help="the config file (.json, .yaml or .yml)")
    check.add_argument("--world-size", type=_positive_int, default=1, metavar="N",
                       help="number of processes to resolve batch sizes for (default: 1)")


def run(args: argparse.Namespace) -> int:
    """Execute ``ds config <COMMAND>``; returns the exit status."""
    if getattr(args, "config_command", None) != "check":
        print("usage: ds config check FILE [--world-size N]", file=sys.stderr)
        return EXIT_USAGE
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = load_config(args.file, world_size=args.world_size)
        except DsError as exc:
            status = EXIT_INVALID
            print(f"error: {exc}", file=sys.stderr)
        else:
            status = EXIT_OK
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    if status == EXIT_OK:
        print(json.dumps(config.to_dict(), indent=2))
    return status
