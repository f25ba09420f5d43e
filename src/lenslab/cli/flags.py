"""Flags generated from spec dataclasses (`lenslab.specs`, `TrainConfig`, `ExtractionConfig`, ...): a field `top_k:
int = 5` with a docstring becomes `--top-k TOP_K`, its docstring the help, its default shown, `Literal` values the
choices, a bool an on/off switch and a list a repeatable flag.

The classes are read from their source text, not imported, because several live in modules that import torch and
`lenslab --help` must stay fast; the class itself is imported only to build the spec from the parsed flags.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lenslab
from lenslab import specs

_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "Path": Path}
_DEFAULT_SENTENCE = re.compile(r"(^|\. |; )None(:| for| means)")
"""Library docstrings say what a None setting means; on the command line that is the default."""


@dataclass(frozen=True)
class Spec:
    """A dataclass, as `"module:Class"`, whose fields become one group of a subcommand's flags."""

    path: str
    title: str | None = None
    """Heading of the group in `--help`; None: no heading of its own."""
    only: tuple[str, ...] | None = None
    """The fields that are flags; None: all. The others keep their defaults."""
    flags: dict[str, dict[str, Any]] = field(default_factory=dict)
    """argparse settings per field beyond what the field says: "names" (the option strings), "type", "metavar",
    "positional"..."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(self.title) if self.title else parser
        taken = {action.dest for action in parser._actions}
        for name, annotation, default, doc in _fields(self.path):
            # A field another spec of the command already made a flag (`--seed`) is shared, not added twice.
            if (self.only is None or name in self.only) and name not in taken:
                _add_flag(group, name, annotation, default, doc, dict(self.flags.get(name, {})))

    def build(self, args: argparse.Namespace) -> Any:
        """The spec the parsed flags describe; the class checks the values (a `LensLabError` for a bad one)."""
        module, name = self.path.split(":")
        names = [name for name, *_ in _fields(self.path) if self.only is None or name in self.only]
        return getattr(importlib.import_module(module), name)(**{name: getattr(args, name) for name in names})


@dataclass(frozen=True)
class Command:
    """A subcommand: its specs, built from the flags, go to `run`."""

    name: str
    help: str
    description: str
    specs: tuple[Spec, ...]
    run: str | Callable[..., int | None]
    """A library function as "module:function", `(*specs, stage=...) -> lenslab.report.Report`, imported only when
    the command runs (`lenslab.cli.console.run`); or a function of the command line's that returns the exit code
    (None for 0)."""


MODEL = Spec("lenslab.specs:ModelSpec", "model", flags={"max_memory": {"type": specs.max_memory}})
TEXT = Spec(
    "lenslab.specs:TextSpec",
    "data",
    flags={"data": {"type": specs.data_source}, "seq_len": {"type": specs.positive_int, "metavar": "N"}},
)
LENSES = Spec("lenslab.specs:LensSpec", "lenses", flags={"lens": {"metavar": "LENS"}})


def _add_flag(parser: Any, name: str, annotation: ast.expr, default: Any, doc: str, settings: dict) -> None:
    if default is _UNREADABLE:
        raise ValueError(f"the default of field {name!r} cannot be read from its source, so it cannot be a flag")
    required = default is _REQUIRED
    choices, many, converter = _kind(annotation, settings.pop("type", None))
    help_text = _DEFAULT_SENTENCE.sub(lambda m: m[1] + ("default:" if m[1] == "; " else "Default:"), doc)
    help_text = help_text.replace("%", "%%")
    if not (required or default is None or default is False or default == []):
        help_text += " (default: %(default)s)"
    kwargs: dict[str, Any] = {"help": help_text}
    if converter is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
    else:
        kwargs |= {"type": converter, "choices": choices}
        kwargs["action"] = "append" if many and not settings.get("nargs") else "store"
    if settings.pop("positional", False):
        parser.add_argument(name, nargs="?", **kwargs, **settings)
        return
    names = settings.pop("names", ("--" + name.replace("_", "-"),))
    parser.add_argument(*names, dest=name, default=None if required else default, required=required, **kwargs,
                        **settings)  # fmt: skip


def _kind(annotation: ast.expr, converter: Callable | None) -> tuple[tuple | None, bool, Callable]:
    """(choices, whether repeated, text -> value) of an annotation: `int`, `X | None`, `Literal[...]`, `list[X]`."""
    node = annotation
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):  # X | None: None is the default
        node = node.left if _is_none(node.right) else node.right
    many = isinstance(node, ast.Subscript) and ast.unparse(node.value) == "list"
    if many:
        node = node.slice
    if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "Literal":
        values = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return tuple(ast.literal_eval(value) for value in values), many, converter or str
    if converter is None and ast.unparse(node) == "bool":
        return None, False, bool
    # argparse words the errors of its own types best ("invalid int value: 'many'").
    return None, many, _argparse_type(converter) if converter else _TYPES[ast.unparse(node)]


def _argparse_type(converter: Callable[[str], Any]) -> Callable[[str], Any]:
    """`converter` with its ValueError turned into argparse's message for the flag (`lenslab.specs` knows no
    argparse)."""

    def parse(text: str) -> Any:
        try:
            return converter(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = converter.__name__  # argparse names the type in "invalid int value" messages
    return parse


def _is_none(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


_REQUIRED = object()
"""The default of a field without one: its flag is required."""
_ARITHMETIC = (ast.Constant, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop)
_UNREADABLE = object()
"""A default computed by code (an imported constant, a factory): such a field cannot be a flag."""


def _fields(path: str) -> list[tuple[str, ast.expr, Any, str]]:
    """(name, annotation, default, docstring) of each field of the dataclass `"module:Class"`, from its source.

    Aliases (`Dtype = Literal[...]`) and constants (`HELDOUT_TOKENS = 65536`) of the module, or imported by it from
    another lenslab module, are resolved.
    """
    module, name = path.split(":")
    tree = ast.parse(_source(module).read_text(encoding="utf-8"))
    names = _module_names(tree)
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name).body
    fields = []
    for node, after in zip(body, [*body[1:], None]):
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        annotation = _Aliases(names).visit(node.annotation)
        doc = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else ""
        fields.append((node.target.id, annotation, _default(node.value, names), " ".join(doc.split())))
    return fields


def _module_names(tree: ast.Module) -> dict[str, ast.expr]:
    """The module's top-level assignments, and those it imports by name from other lenslab modules."""
    names: dict[str, ast.expr] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lenslab."):
            imported = _module_names(ast.parse(_source(node.module).read_text(encoding="utf-8")))
            names |= {
                alias.asname or alias.name: imported[alias.name] for alias in node.names if alias.name in imported
            }
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            names[node.targets[0].id] = node.value
    return names


def _source(module: str) -> Path:
    """The file of lenslab module `module`, found without importing it."""
    return Path(lenslab.__file__).parent.joinpath(*module.split(".")[1:]).with_suffix(".py")


class _Aliases(ast.NodeTransformer):
    """Replaces the module's type aliases in an annotation by what they stand for."""

    def __init__(self, names: dict[str, ast.expr]) -> None:
        self.names = names

    def visit_Name(self, node: ast.Name) -> ast.expr:
        alias = self.names.get(node.id)
        return alias if isinstance(alias, ast.Subscript) else node


def _default(node: ast.expr | None, names: dict[str, ast.expr]) -> Any:
    if node is None:
        return _REQUIRED
    if isinstance(node, ast.Call) and ast.unparse(node.func) == "field":
        factory = next((k.value for k in node.keywords if k.arg == "default_factory"), None)
        return [] if factory is not None and ast.unparse(factory) == "list" else _REQUIRED
    if isinstance(node, ast.Name) and node.id in names:
        node = names[node.id]
    # Constants and arithmetic on them (2**18); nothing that could run code.
    if all(isinstance(part, _ARITHMETIC) for part in ast.walk(node)):
        return eval(compile(ast.Expression(node), "<default>", "eval"), {"__builtins__": {}})
    return _UNREADABLE
