"""The flag builder (`lenslab.cli.flags`): flags generated from the source of spec dataclasses, and every
subcommand's help showing its defaults."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lenslab.cli import build_parser, commands, flags
from lenslab.specs import ModelSpec

EXAMPLE = '''
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Colour = Literal["red", "green"]
STEPS = 2**10


@dataclass
class Example:
    """Not read: only fields make flags."""

    output: Path
    """Where to write it."""
    steps: int = STEPS
    """Optimiser steps."""
    rate: float = 0.5
    """Learning rate; 100% of it at the start."""
    colour: Colour = "red"
    """Colour of the line."""
    names: list[str] = field(default_factory=list)
    """A name; repeat for several."""
    limit: int | None = None
    """Most tokens. Default: all of them."""
    fast: bool = False
    """Go fast."""
    check: bool = True
    """Check the result."""


@dataclass
class Computed:
    workers: int = os.cpu_count()
    """Worker processes."""
'''


@pytest.fixture
def example(tmp_path, monkeypatch) -> argparse.ArgumentParser:
    """A parser with the flags of `Example`, a spec dataclass in a module of its own."""
    source = tmp_path / "example.py"
    source.write_text(textwrap.dedent(EXAMPLE), encoding="utf-8")
    monkeypatch.setattr(flags, "_source", lambda module: source)
    parser = argparse.ArgumentParser(prog="example")
    flags.Spec("lenslab.example:Example").add_to(parser)
    return parser


def test_fields_become_typed_flags_with_their_defaults(example):
    args = example.parse_args(["--output", "out.json"])
    assert vars(args) == {
        "output": Path("out.json"), "steps": 1024, "rate": 0.5, "colour": "red", "names": [], "limit": None,
        "fast": False, "check": True,
    }  # fmt: skip
    args = example.parse_args(["--output", "o", "--steps", "7", "--rate", "1e-3", "--colour", "green", "--names",
                               "a", "--names", "b", "--limit", "9", "--fast", "--no-check"])  # fmt: skip
    assert (args.steps, args.rate, args.colour, args.names, args.limit) == (7, 1e-3, "green", ["a", "b"], 9)
    assert args.fast and not args.check


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "7"], "the following arguments are required: --output"),
        (["--output", "o", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
        (["--output", "o", "--colour", "blue"], "argument --colour: invalid choice: 'blue'"),
    ],
)
def test_bad_values_are_argparse_errors(example, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_help_is_the_docstring_with_the_default(example):
    text = " ".join(example.format_help().split())
    assert "--output OUTPUT Where to write it." in text
    assert "--steps STEPS Optimiser steps. (default: 1024)" in text  # a module constant, computed, is shown
    assert "Learning rate; 100% of it at the start. (default: 0.5)" in text  # % is not read as a format
    assert "--colour {red,green} Colour of the line. (default: red)" in text  # a type alias is resolved
    assert "--limit LIMIT Most tokens. Default: all of them." in text  # "None" in the docstring reads as the default
    assert "--check, --no-check Check the result. (default: True)" in text
    assert "Go fast. (default" not in text and "several. (default" not in text  # off and empty say nothing


def test_a_default_computed_by_code_cannot_be_a_flag(example):
    with pytest.raises(ValueError, match="the default of field 'workers' cannot be read from its source"):
        flags.Spec("lenslab.example:Computed").add_to(argparse.ArgumentParser())


def test_a_spec_is_built_from_the_parsed_flags():
    parser = argparse.ArgumentParser()
    flags.MODEL.add_to(parser)
    args = parser.parse_args(["--model", "gpt2", "--dtype", "float32", "--max-memory", "0=20GiB,cpu=60GiB"])
    assert flags.MODEL.build(args) == ModelSpec("gpt2", dtype="float32", max_memory={0: "20GiB", "cpu": "60GiB"})


def test_a_field_two_specs_share_is_one_flag():
    parser = argparse.ArgumentParser()
    flags.TEXT.add_to(parser)  # has --seed
    flags.Spec("lenslab.causal.basis:ExtractionConfig", only=("k", "seed")).add_to(parser)
    assert [action.dest for action in parser._actions].count("seed") == 1


@pytest.mark.parametrize("command", [command.name for command in commands()])
def test_every_default_is_in_the_help(command):
    """Every flag with a default to show (not off, empty or None) says it in `lenslab COMMAND --help`."""
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS) and action.help:
            assert "%(default)s" in action.help, f"{command} {action.option_strings[0]}"


def test_help_loads_no_framework():
    """`lenslab --help` and every subcommand's help read the specs' source: torch, transformers and the plotting
    libraries stay unloaded, so help is instant."""
    code = (
        "import sys\nfrom lenslab.cli import SUBCOMMANDS, main\nfor name in SUBCOMMANDS:\n    try:\n"
        "        main([name, '--help'])\n    except SystemExit:\n        pass\n"
        "loaded = {'torch', 'transformers', 'matplotlib', 'plotly', 'sklearn'} & set(sys.modules)\n"
        "print(sorted(loaded), file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stderr.strip() == "[]"
