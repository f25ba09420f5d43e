"""What a command found, as the command line shows it (`lenslab.runs` makes one per command): its tables, the files
it wrote and a reading of the result in words. Torch-free, so that the command line can hold one.

>>> Report(("the tuned lens is closer to the model than the logit lens at every layer", "...")).written
[]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table

WIDTH = 80
"""Columns a table and its footnotes keep within."""


@dataclass
class Report:
    """A command's result in words and files."""

    reading: tuple[str, ...]
    """Usually two lines on what the result means, e.g. "the tuned lens is closer to the model than the logit lens
    at every layer; largest gap at layer 0"."""
    written: list[Path] = field(default_factory=list)
    """The files the command wrote, in order."""
    tables: list[Table] = field(default_factory=list)
    """Rich tables of the result, each within `WIDTH` columns."""
    footnotes: list[str] = field(default_factory=list)
    """Short phrases under the last table, joined by "; "."""
