"""Static PNG picture of prediction trajectories (matplotlib), the grid of ``lenslab.plots.grid`` sized for a page.

The figure is at most ``PAGE_INCHES`` wide: a long prompt wraps into bands of ``tokens_per_band`` columns, each
band showing every lens, one under the other, on one colour scale whose key runs along the bottom.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from matplotlib import colormaps, font_manager, rc_context
from matplotlib.figure import Figure

from lenslab.errors import LensLabError
from lenslab.plots import grid
from lenslab.plots.palette import DPI, kind_color, save_png, short_model_name
from lenslab.plots.scales import STATISTICS, color_norm, is_dark, statistic_label, value_range
from lenslab.trajectory import Trajectory

PAGE_INCHES = 7.5
"""Widest figure: a page's text width, so that a paper shows it at about its drawn size."""
CELL_INCHES = (0.56, 0.24)
"""Width and height of one cell."""
LABEL_INCHES = 1.3
"""Width of the row labels left of the cells."""
PANEL_INCHES = 0.75
"""Height of a panel's title, its token labels above and below and the space to the next panel."""
FRAME_INCHES = 1.4
"""Height of the figure's title, legend and colour key."""
CELL_CHARS = 8
"""Longest token text shown in a cell or a column label; longer ones end in …."""
MAX_PIXELS = 2**16
"""Matplotlib refuses images this large or larger in either direction."""
# Fonts tried after DejaVu Sans for glyphs it lacks (CJK, ...); only installed ones are used.
FALLBACK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "WenQuanYi Zen Hei", "Droid Sans Fallback", "Noto Sans")


def tokens_per_band() -> int:
    """Token columns that fit across a page."""
    return int((PAGE_INCHES - LABEL_INCHES) / CELL_INCHES[0])


def size_inches(trajectories: Sequence[Trajectory]) -> tuple[float, float]:
    """Width and height of the figure: each band's panels (one per lens) stacked, plus title and colour key."""
    n_positions, n_tokens = trajectories[0].entropy.shape
    panels = len(trajectories) * math.ceil(n_tokens / tokens_per_band())
    return (
        LABEL_INCHES + min(n_tokens, tokens_per_band()) * CELL_INCHES[0],
        panels * (n_positions * CELL_INCHES[1] + PANEL_INCHES) + FRAME_INCHES,
    )


def figure(trajectories: Sequence[Trajectory], stat: str = "entropy") -> Figure:
    """A matplotlib Figure (no pyplot state) of ``trajectories`` coloured by ``stat``."""
    norm = color_norm(stat, value_range(trajectories, stat))
    cmap = colormaps[STATISTICS[stat].colormap]
    first = trajectories[0]
    bands = grid.token_bands(first.entropy.shape[1], tokens_per_band())
    fig = Figure(figsize=size_inches(trajectories), layout="constrained")
    # Every panel as wide as a full band, so a column sits at the same place in every band.
    axes = fig.subplots(len(bands) * len(trajectories), 1, squeeze=False)[:, 0]
    with _fonts():
        for b, band in enumerate(bands):
            for i, trajectory in enumerate(trajectories):
                ax = axes[b * len(trajectories) + i]
                values = np.ma.masked_invalid(trajectory.statistic(stat)[:, band.start : band.stop])
                image = ax.imshow(values, cmap=cmap, norm=norm, origin="lower", aspect="auto", interpolation="nearest")
                ax.set_xlim(-0.5, len(bands[0]) - 0.5)
                _write_cells(ax, trajectory, band, cmap(norm(values)))
                ax.set_xticks(
                    range(len(band)), [grid.fit(trajectory.tokens[t], CELL_CHARS) for t in band], fontsize=6.5
                )
                ax.set_yticks(range(trajectory.num_positions), grid.row_labels(trajectory), fontsize=7)
                ax.tick_params(length=0)
                ax.set_title(grid.panel_title(trajectory, band, len(bands)), fontsize=8, loc="left",
                             color=kind_color(trajectory.lens_kind), fontweight="bold")  # fmt: skip
                next_axis = _next_token_axis(ax, trajectory, band)
                if ax is axes[0]:
                    next_axis.set_xlabel(grid.NEXT_LABEL, fontsize=7)
        fig.colorbar(image, ax=list(axes), location="bottom", label=statistic_label(first, stat), shrink=0.6,
                     aspect=40, pad=0.01)  # fmt: skip
        axes[-1].set_xlabel("input token", fontsize=7)
        fig.supylabel("lens position", fontsize=8)
        fig.suptitle(
            f"{short_model_name(first.model_name)}: {statistic_label(first, stat)}; {grid.CELL_TEXT}", fontsize=9
        )
    return fig


def write_png(trajectories: Sequence[Trajectory], path: str | Path, stat: str = "entropy", dpi: int = DPI) -> Path:
    """Write the figure to ``path`` atomically as PNG; returns the path."""
    height = size_inches(trajectories)[1] * dpi
    if height >= MAX_PIXELS:
        n_positions, n_tokens = trajectories[0].entropy.shape
        band_inches = len(trajectories) * (n_positions * CELL_INCHES[1] + PANEL_INCHES)
        fitting = int((MAX_PIXELS / dpi - FRAME_INCHES) / band_inches) * tokens_per_band()
        raise LensLabError(
            f"A PNG of {n_tokens} tokens would be {height:,.0f} pixels tall, more than matplotlib draws "
            f"({MAX_PIXELS:,}); pass --positions START:END with at most {fitting} tokens, or write .html."
        )
    return save_png(figure(trajectories, stat), path, dpi)


def _write_cells(ax, trajectory: Trajectory, band: range, backgrounds: np.ndarray) -> None:
    """Each cell's top-1 token, white on dark backgrounds and black on light ones."""
    top1 = trajectory.top_k_ids[:, band.start : band.stop, 0].numpy()
    for (p, t), token_id in np.ndenumerate(top1):
        color = "white" if is_dark(backgrounds[p, t]) else "black"
        text = grid.fit(trajectory.token_text[int(token_id)], CELL_CHARS)
        ax.text(t, p, text, ha="center", va="center", fontsize=5.5, color=color, clip_on=True)


def _next_token_axis(ax, trajectory: Trajectory, band: range):
    """Top axis: the true next token above each column, green and bold with ✓ where the model's top-1 is right."""
    right = grid.model_is_right(trajectory)[band.start : band.stop]
    next_ids = trajectory.next_ids[band.start : band.stop].tolist()
    labels = [
        "" if n < 0 else (grid.CORRECT_MARK if correct else "") + grid.fit(trajectory.token_text[n], CELL_CHARS)
        for n, correct in zip(next_ids, right)
    ]
    top = ax.secondary_xaxis("top")
    top.set_xticks(range(len(labels)), labels, fontsize=6.5)
    top.tick_params(length=0)
    for tick_label, correct in zip(top.get_xticklabels(), right):
        tick_label.set_color(grid.CORRECT_COLOR if correct else grid.MISSED_COLOR)
        tick_label.set_fontweight("bold" if correct else "normal")
    return top


@cache
def _font_families() -> tuple[str, ...]:
    installed = {entry.name for entry in font_manager.fontManager.ttflist}
    return ("DejaVu Sans", *(name for name in FALLBACK_FONTS if name in installed))


def _fonts():
    """rc context with DejaVu Sans (has ␣ ↵ ✓) and any installed fallbacks; texts take fonts when created."""
    return rc_context({"font.family": list(_font_families())})
