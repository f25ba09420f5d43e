"""Prediction depth (`lenslab depth`): a terminal table and a PNG histogram of tokens per depth, with the mean loss.

Drawn on a bare ``matplotlib.figure.Figure`` (no pyplot, no display) and written atomically.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from lenslab.applications.depth import DepthResult


def print_depth_table(result: DepthResult, *, lens_kind: str, console: Console | None = None) -> None:
    """Print tokens, mean loss and (with checkpoints) mean learning checkpoint per prediction depth."""
    summary = result.by_depth()
    caption = f"Spearman(depth, loss) = {_format(result.spearman_depth_loss)}"
    if result.learned is not None:
        caption += f"; Spearman(depth, learning checkpoint) = {_format(result.spearman_depth_learned)}"
    table = Table(title=f"Prediction depth ({lens_kind} lens), {result.depths.numel():,} tokens", caption=caption)
    for column in ("depth", "tokens", "share", "mean loss (nats)"):
        table.add_column(column, justify="right")
    if result.learned is not None:
        table.add_column("mean learning checkpoint", justify="right")
    total = result.depths.numel()
    for depth, (count, loss) in enumerate(zip(summary.counts, summary.mean_loss)):
        cells = [str(depth), f"{count:,}", f"{count / total:.1%}", _format(loss)]
        if result.learned is not None:
            cells.append(_format(summary.mean_learned[depth]))
        table.add_row(*cells)
    (console or Console()).print(table)


def plot_depth_histogram(result: DepthResult, path: Path, *, title: str) -> Path:
    """Write a bar chart of tokens per prediction depth, with the mean loss per depth on a second axis."""
    from matplotlib.figure import Figure

    from lenslab.artifacts import atomic_write

    summary = result.by_depth()
    depths = range(result.num_layers + 1)
    figure = Figure(figsize=(6.5, 4), layout="constrained")
    axes = figure.subplots()
    axes.bar(depths, summary.counts, color="tab:blue", alpha=0.7)
    axes.set_xlabel("prediction depth (layer; 0 = embeddings)")
    axes.set_ylabel("tokens", color="tab:blue")
    axes.set_xticks(list(depths))
    loss_axes = axes.twinx()
    loss_axes.plot(depths, summary.mean_loss, color="tab:red", marker="o")
    loss_axes.set_ylabel("mean loss (nats)", color="tab:red")
    axes.set_title(f"{title}\nSpearman(depth, loss) = {_format(result.spearman_depth_loss)}")
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=150))
    return path


def _format(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"  # NaN != NaN
