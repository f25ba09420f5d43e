"""Prediction depth (`lenslab depth`): a terminal table and a PNG histogram of tokens per depth, with the mean loss.

Drawn on a bare ``matplotlib.figure.Figure`` (no pyplot, no display) and written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from rich.table import Table

from lenslab.applications.depth import DepthResult
from lenslab.plots.palette import MODEL_COLOR, kind_color, save_png, short_model_name


def depth_table(result: DepthResult, *, lens_kind: str) -> Table:
    """Tokens, mean loss and (with checkpoints) mean learning checkpoint per prediction depth."""
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
    return table


def plot_depth_histogram(result: DepthResult, path: str | Path, *, model: str, lens_kind: str) -> Path:
    """Write ``depth_figure`` to the PNG at ``path``; returns the path."""
    return save_png(depth_figure(result, model=model, lens_kind=lens_kind), path)


def depth_figure(result: DepthResult, *, model: str, lens_kind: str) -> Figure:
    """A bar chart of tokens per prediction depth, with the mean loss per depth (± one standard error) on a second
    axis that starts at zero."""
    summary = result.by_depth()
    depths = range(result.num_layers + 1)
    color = kind_color(lens_kind)
    figure = Figure(figsize=(6.5, 4), layout="constrained")
    axes = figure.subplots()
    axes.bar(depths, summary.counts, color=color, alpha=0.75)
    axes.set_xlabel("prediction depth (layer; 0 = embeddings)")
    axes.set_ylabel(f"tokens ({lens_kind} lens)", color=color)
    axes.set_xticks(list(depths))
    loss_axes = axes.twinx()
    loss_axes.errorbar(depths, summary.mean_loss, yerr=standard_errors(result), color=MODEL_COLOR, marker="o",
                       capsize=3, label="mean loss ± 1 s.e.")  # fmt: skip
    loss_axes.set_ylim(bottom=0)
    loss_axes.set_ylabel("model's mean loss (nats), from 0")
    loss_axes.legend(loc="upper right", fontsize="small")
    axes.set_title(
        f"{short_model_name(model)}: prediction depth by the {lens_kind} lens, {result.depths.numel():,} tokens\n"
        f"Spearman(depth, loss) = {_format(result.spearman_depth_loss)}",
        fontsize="medium",
    )  # fmt: skip
    return figure


def standard_errors(result: DepthResult) -> list[float]:
    """Standard error of the mean loss at each depth 0..L: NaN where a depth has fewer than two tokens."""
    depths, losses = result.depths.flatten().numpy(), result.losses.flatten().double().numpy()
    errors = []
    for depth in range(result.num_layers + 1):
        chosen = losses[depths == depth]
        errors.append(float(chosen.std(ddof=1) / np.sqrt(len(chosen))) if len(chosen) > 1 else math.nan)
    return errors


def _format(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"  # NaN != NaN
