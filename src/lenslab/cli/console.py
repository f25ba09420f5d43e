"""What every subcommand prints: progress with an ETA on stderr; tables within 80 columns, their footnotes broken
between phrases; the files written; and a two-line reading of the result on stdout."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

WIDTH = 80
"""Columns a table and its footnotes keep within."""


@contextlib.contextmanager
def stages() -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """A progress bar per stage of a library call: `stage(description, total)` starts one (ending the previous) and
    returns `advance(n)`, which the library calls after each batch."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=True,
    ) as progress:  # fmt: skip

        def stage(description: str, total: int) -> Callable[[int], None]:
            for task in progress.task_ids:
                progress.remove_task(task)
            task = progress.add_task(description, total=total)
            return lambda n: progress.advance(task, n)

        yield stage


def shorten(name: str, width: int = 12) -> str:
    """A lens or model name that fits a column: a path's last part, its middle cut to `width` characters."""
    name = Path(name).name or name
    return name if len(name) <= width else f"{name[: (width - 1) // 2]}…{name[-(width // 2) :]}"


def print_table(table: Table, footnotes: Sequence[str] = ()) -> None:
    """`table` within `WIDTH` columns, then `footnotes` joined by "; " and broken only between them."""
    console = Console(width=min(Console().width, WIDTH))
    console.print(table)
    lines = [""]
    for note in footnotes:
        joined = f"{lines[-1]}; {note}" if lines[-1] else note
        if len(joined) <= console.width or not lines[-1]:
            lines[-1] = joined
        else:
            lines.append(note)
    for line in filter(None, lines):
        console.print(line, style="dim", markup=False, highlight=False)


def conclude(written: Sequence[Path], reading: tuple[str, str]) -> None:
    """Say which files were written (stderr), then the two-line reading of the result (stdout)."""
    if written:
        Console(stderr=True).print("Wrote " + ", ".join(map(str, written)), markup=False, highlight=False)
    for line in reading:
        print(line)
