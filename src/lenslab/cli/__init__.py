"""The `lenslab` command line: one subcommand per job, each in its own module of this package.

Each subcommand is a `Command`: the specs its flags are generated from (`lenslab.cli.flags`) and the one library
call that takes them (`lenslab.runs`), whose `Report` the command line shows (`lenslab.cli.console`): tables, the
files written, a two-line reading. The library raises `LensLabError` for bad input, before expensive work starts.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from lenslab import __version__
from lenslab.cli import console
from lenslab.cli.flags import Command
from lenslab.errors import LensLabError

# Subcommand modules, in the order `--help` lists them; each holds `COMMANDS`.
MODULES = ["train", "eval", "show", "detect", "depth", "transfer", "cbe", "convert", "push", "example_model"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lenslab",
        description="See what every layer of a transformer predicts (logit lens, tuned lens and more).",
    )
    parser.add_argument("--version", action="version", version=f"lenslab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in commands():
        sub = subparsers.add_parser(command.name, help=command.help, description=command.description)
        for spec in command.specs:
            spec.add_to(sub)
        sub.set_defaults(command_=command)
    return parser


def commands() -> list[Command]:
    return [command for module in MODULES for command in importlib.import_module(f"lenslab.cli.{module}").COMMANDS]


SUBCOMMANDS: list[str] = [command.name for command in commands()]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 success, 2 bad input, 130 interrupted by Ctrl-C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    if os.environ.get("RANK", "0") != "0":
        # Under torchrun every rank runs this CLI; only rank 0 reports progress, the others only problems.
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    command: Command = args.command_
    try:
        specs = [spec.build(args) for spec in command.specs]
        return console.run(command.run, specs) if isinstance(command.run, str) else int(command.run(*specs) or 0)
    except LensLabError as error:
        print(f"lenslab {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Every file is written to a temporary name and renamed into place, so none is left half-written.
        print(f"lenslab {args.command}: interrupted; no file was left half-written.", file=sys.stderr)
        return 130
