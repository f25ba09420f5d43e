"""Static PNG picture of prediction trajectories (matplotlib), the grid of the HTML view for papers.

One panel per lens, side by side with one colour bar: lens positions as rows (the model's output at
the top), input tokens along the bottom, the true next token along the top (green with ✓ where the
model's own top-1 prediction is right), and each cell's most likely next token written in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from matplotlib import colormaps, colors, font_manager, rc_context
from matplotlib.figure import Figure

from lenslab.artifacts import atomic_write
from lenslab.errors import LensLabError
from lenslab.tokens import visible
from lenslab.trajectory import STATISTICS, Trajectory, value_range

CELL_INCHES = (0.62, 0.3)
"""Width and height of one cell."""
MARGIN_INCHES = (3.5, 2.8)
"""Width and height of the labels, titles and colour bar around the cells."""
MAX_PIXELS = 2**16
"""Matplotlib refuses images this wide or wider."""
CORRECT_COLOR = "#1a7f37"
MISSED_COLOR = "#57606a"
# Fonts tried after DejaVu Sans for glyphs it lacks (CJK, ...); only installed ones are used.
FALLBACK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "WenQuanYi Zen Hei", "Droid Sans Fallback", "Noto Sans")


def color_norm(stat: str, value_range: tuple[float, float]) -> colors.Normalize:
    """The matplotlib normalisation of ``stat`` over ``value_range`` (log for ranks, centred for scores)."""
    low, high = value_range
    statistic = STATISTICS[stat]
    if statistic.log_scale:
        return colors.LogNorm(vmin=max(low, 1.0), vmax=high)
    if statistic.diverging:
        return colors.TwoSlopeNorm(vcenter=0.0, vmin=low, vmax=high)
    return colors.Normalize(vmin=low, vmax=high)


def is_dark(rgba: Sequence[float]) -> bool:
    """Whether text on this background should be white: relative luminance below one half, and opaque
    (the colour map's transparent "bad" colour over an undefined cell shows the white page)."""
    red, green, blue, alpha = rgba
    return alpha > 0 and 0.2126 * red + 0.7152 * green + 0.0722 * blue < 0.5


def size_inches(trajectories: Sequence[Trajectory]) -> tuple[float, float]:
    """Width and height of the figure: a cell per lens position and token, plus room for labels."""
    n_positions, n_tokens = trajectories[0].entropy.shape
    return (
        len(trajectories) * n_tokens * CELL_INCHES[0] + MARGIN_INCHES[0],
        n_positions * CELL_INCHES[1] + MARGIN_INCHES[1],
    )


def figure(trajectories: Sequence[Trajectory], stat: str = "entropy") -> Figure:
    """A matplotlib Figure (no pyplot state) of ``trajectories`` coloured by ``stat``."""
    statistic = STATISTICS[stat]
    norm = color_norm(stat, value_range(trajectories, stat))
    cmap = colormaps[statistic.colormap]
    n_positions, n_tokens = trajectories[0].entropy.shape
    fig = Figure(figsize=size_inches(trajectories), layout="constrained")
    axes = fig.subplots(1, len(trajectories), sharey=True, squeeze=False)[0]
    with _fonts():
        for ax, trajectory in zip(axes, trajectories):
            values = np.ma.masked_invalid(trajectory.statistic(stat))
            image = ax.imshow(values, cmap=cmap, norm=norm, origin="lower", aspect="auto", interpolation="nearest")
            _write_cells(ax, trajectory, cmap(norm(values)))
            ax.set_xticks(range(n_tokens), [visible(t) for t in trajectory.tokens], rotation=60, ha="right",
                          rotation_mode="anchor", fontsize=8)  # fmt: skip
            ax.set_yticks(range(n_positions), trajectory.row_labels, fontsize=8)
            ax.set_title(f"{trajectory.lens_name} lens", fontsize=10)
            _next_token_axis(ax, trajectory)
        fig.colorbar(image, ax=list(axes), label=statistic.label, fraction=0.02 if len(axes) > 1 else 0.05)
        fig.suptitle(f"{trajectories[0].model_name}: {statistic.label}", fontsize=10)
    return fig


def write_png(trajectories: Sequence[Trajectory], path: str | Path, stat: str = "entropy", dpi: int = 150) -> Path:
    """Write the figure to ``path`` atomically as PNG; returns the path."""
    path = Path(path)
    width = size_inches(trajectories)[0] * dpi
    if width >= MAX_PIXELS:
        n_tokens = trajectories[0].entropy.shape[1]
        fitting = int((MAX_PIXELS / dpi - MARGIN_INCHES[0]) / (len(trajectories) * CELL_INCHES[0]))
        raise LensLabError(
            f"A PNG of {n_tokens} tokens would be {width:,.0f} pixels wide, more than matplotlib draws "
            f"({MAX_PIXELS:,}); pass --positions START:END with at most {fitting} tokens, or write .html."
        )
    fig = figure(trajectories, stat)
    atomic_write(path, lambda temporary: fig.savefig(temporary, format="png", dpi=dpi))
    return path


def _write_cells(ax, trajectory: Trajectory, backgrounds: np.ndarray) -> None:
    """Each cell's top-1 token, white on dark backgrounds and black on light ones."""
    for (p, t), token_id in np.ndenumerate(trajectory.top_k_ids[:, :, 0].numpy()):
        color = "white" if is_dark(backgrounds[p, t]) else "black"
        ax.text(t, p, visible(trajectory.token_text[int(token_id)]), ha="center", va="center", fontsize=6.5,
                color=color, clip_on=True)  # fmt: skip


def _next_token_axis(ax, trajectory: Trajectory) -> None:
    """Top axis: the true next token above each column, green with ✓ where the model's top-1 is right."""
    output_top1 = trajectory.top_k_ids[-1, :, 0].tolist()
    next_ids = trajectory.next_ids.tolist()
    labels = [
        "" if n < 0 else ("✓" if n == top1 else "") + visible(trajectory.token_text[n])
        for n, top1 in zip(next_ids, output_top1)
    ]
    top = ax.secondary_xaxis("top")
    top.set_xticks(range(len(labels)), labels, rotation=60, ha="left", rotation_mode="anchor", fontsize=8)
    for tick_label, n, top1 in zip(top.get_xticklabels(), next_ids, output_top1):
        correct = n >= 0 and n == top1
        tick_label.set_color(CORRECT_COLOR if correct else MISSED_COLOR)
        tick_label.set_fontweight("bold" if correct else "normal")


@cache
def _font_families() -> tuple[str, ...]:
    installed = {entry.name for entry in font_manager.fontManager.ttflist}
    return ("DejaVu Sans", *(name for name in FALLBACK_FONTS if name in installed))


def _fonts():
    """rc context with DejaVu Sans (has ␣ ↵ ✓) and any installed fallbacks; texts take fonts when created."""
    return rc_context({"font.family": list(_font_families())})
