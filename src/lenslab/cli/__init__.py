"""The `lenslab` command line: one subcommand per job, each in its own module of this package.

Every subcommand module exposes `register(subparsers)`, which adds its parser and sets
`run=<function taking the parsed namespace and returning an exit code>`. The CLI owns user-facing
output; the library underneath only returns results and raises `LensLabError` for bad input. Output paths are
checked before any model loads (`lenslab.cli.outputs`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from lenslab import __version__
from lenslab.errors import LensLabError

# Subcommand modules, in the order `--help` lists them.
SUBCOMMANDS: list[str] = ["train", "eval", "show", "detect", "depth", "transfer", "cbe", "example-model"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lenslab",
        description="See what every layer of a transformer predicts (logit lens, tuned lens and more).",
    )
    parser.add_argument("--version", action="version", version=f"lenslab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"lenslab.cli.{name.replace('-', '_')}").register(subparsers)
    return parser


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
    try:
        return int(args.run(args) or 0)
    except LensLabError as error:
        print(f"lenslab {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Every file is written to a temporary name and renamed into place, so none is left half-written.
        print(f"lenslab {args.command}: interrupted; no file was left half-written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
