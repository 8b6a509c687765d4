"""The ``ds`` command line: ``ds report`` plus the subcommands plugins register.

``report`` is built in rather than registered, so the tool that explains a broken
installation still works when a plugin's registrations do not. Plugins add subcommands
through the hook ``ds_register_commands``::

    @ds.core.hookimpl
    def ds_register_commands(register):
        register("checkpoint", Command(help="inspect and export checkpoints",
                                       configure=add_arguments, run=run))

A :class:`ds.core.errors.DsError` raised by a command is printed as one line on stderr
and the exit status is 1; other exceptions keep their traceback, since they are bugs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ds.core.errors import DsError, PluginError
from ds.core.plugins import Components, default_components

BUILTIN_COMMANDS = ("report",)


@dataclass(frozen=True)
class Command:
    """A ``ds`` subcommand: ``configure(parser)`` adds its arguments, ``run(args)`` returns the exit status.

    ``run`` finds the loaded :class:`ds.core.plugins.Components` as ``args.components``.
    """

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _report_command() -> Command:
    from ds.core.cli import report

    return Command(help="show versions, devices, plugins and which kernel runs each op",
                   configure=report.configure, run=report.run)


def build_parser(components: Components) -> argparse.ArgumentParser:
    """The ``ds`` parser with the built-in subcommands and every plugin's."""
    parser = argparse.ArgumentParser(prog="ds", description="ds: train and serve large PyTorch models.")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands = {"report": _report_command()}
    for registration in components.commands:
        if registration.name in BUILTIN_COMMANDS:
            raise PluginError(f"plugin {registration.plugin!r} registers command {registration.name!r}, which is "
                              "built into ds; register it under another name")
        if not isinstance(registration.value, Command):
            raise PluginError(f"plugin {registration.plugin!r} registered command {registration.name!r} as "
                              f"{registration.value!r}; pass ds.core.cli.Command(help=..., configure=..., run=...)")
        commands[registration.name] = registration.value
    for name, command in commands.items():
        subparser = subcommands.add_parser(name, help=command.help, description=command.help)
        command.configure(subparser)
        subparser.set_defaults(_run=command.run, components=components)
    return parser


def main(argv: Sequence[str] | None = None, *, components: Components | None = None) -> int:
    """Run ``ds`` with ``argv`` (default: the process arguments) and return the exit status.

    ``components`` defaults to the installed plugins; tests pass their own.
    """
    try:
        parser = build_parser(components or default_components())
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # argparse exits on --help and on bad arguments
            return exit_.code if isinstance(exit_.code, int) else 2
        return args._run(args)
    except DsError as exc:
        print(f"ds: error: {exc}", file=sys.stderr)
        return 1


__all__ = ["BUILTIN_COMMANDS", "Command", "build_parser", "main"]
