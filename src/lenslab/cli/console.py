"""What every subcommand shows: progress with an ETA on stderr while the library works, then its `Report`: tables
within 80 columns with their footnotes broken between phrases, the files written, and the reading on stdout."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lenslab.report import WIDTH, Report


def run(function: str, specs: Sequence[object]) -> int:
    """Call the library function `"module:function"` with `specs` and `stage=`, then show its report; the exit code
    is 0. `stage(description, total)` starts a progress bar with an ETA (ending the previous one) and returns
    `advance(n)`, which the library calls after each batch."""
    module, name = function.split(":")
    progress: Progress | None = None  # started by the first stage, so that a command refused at once prints no bar

    def stage(description: str, total: int | None) -> Callable[[int], None]:
        nonlocal progress
        if progress is None:
            progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                console=Console(stderr=True), transient=True,
            )  # fmt: skip
            progress.start()
        for task in progress.task_ids:
            progress.remove_task(task)
        task = progress.add_task(description, total=total)
        return lambda n: progress.advance(task, n)

    try:
        report = getattr(importlib.import_module(module), name)(*specs, stage=stage)
    finally:
        if progress is not None:
            progress.stop()
    show(report)
    return 0


def show(report: Report) -> None:
    """The report's tables within `WIDTH` columns and its footnotes, then `conclude`."""
    console = Console(width=min(Console().width, WIDTH))
    for table in report.tables:
        console.print(table)
    for line in footer(report.footnotes, console.width):
        console.print(line, style="dim", markup=False, highlight=False)
    conclude(report.written, report.reading)


def footer(notes: Sequence[str], width: int) -> list[str]:
    """`notes` joined by "; " into lines of at most `width` characters, broken only between notes (a note longer
    than `width` stands on a line of its own)."""
    lines: list[str] = []
    for note in notes:
        if lines and len(joined := f"{lines[-1]}; {note}") <= width:
            lines[-1] = joined
        else:
            lines.append(note)
    return lines


def conclude(written: Sequence[Path], reading: Sequence[str]) -> None:
    """Say which files were written (stderr), then the reading of the result (stdout)."""
    if written:
        Console(stderr=True).print("Wrote " + ", ".join(map(str, written)), markup=False, highlight=False)
    for line in reading:
        print(line)
