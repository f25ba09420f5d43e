"""Terminal view of prediction trajectories (rich), for a quick look over SSH.

The grid of ``lenslab.plots.grid``, each cell's top-1 token on a background coloured by the statistic, with a
header row of the true next tokens. Prompts wider than the terminal are cut into several tables of consecutive
columns; the last table's caption is the legend: the colour key and what the ✓ and the cell texts mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps, colors
from rich.table import Table
from rich.text import Text

from lenslab.plots.grid import CELL_TEXT, CORRECT_MARK, NEXT_LABEL, fit, model_is_right, row_labels, token_bands
from lenslab.plots.palette import lens_label
from lenslab.plots.scales import STATISTICS, color_norm, is_dark, statistic_label, value_range
from lenslab.trajectory import Trajectory

CELL_CHARS = 8
"""Longest token text shown in a cell; longer ones end in …."""
KEY_STEPS = 8
"""Colour swatches in the legend's colour key."""


def tables(trajectories: Sequence[Trajectory], stat: str = "entropy", width: int = 120) -> list[Table]:
    """Rich tables for ``trajectories`` coloured by ``stat``, each at most about ``width`` characters wide."""
    value_span = value_range(trajectories, stat)
    norm = color_norm(stat, value_span)
    cmap = colormaps[STATISTICS[stat].colormap]
    label = statistic_label(trajectories[0], stat)
    label_width = max(len(row) for row in row_labels(trajectories[0]))
    # Each column takes its cell text plus rich's padding and border (3 characters).
    per_table = max(1, (width - label_width - 4) // (CELL_CHARS + 3))
    result = []
    for trajectory in trajectories:
        backgrounds = cmap(norm(trajectory.statistic(stat)))  # [P, N, 4]; undefined cells transparent
        for columns in token_bands(trajectory.entropy.shape[1], per_table):
            result.append(_table(trajectory, label, columns, backgrounds))
    result[-1].caption = legend(label, norm, cmap, value_span)
    return result


def legend(label: str, norm: colors.Normalize, cmap: colors.Colormap, value_span: tuple[float, float]) -> Text:
    """Two lines: the colour key from the lowest to the highest value, then what the ✓ and the cells mean."""
    low, high = value_span
    # Swatches evenly spaced in the colour map, so a log or centred scale reads the same as in the pictures.
    swatches = cmap(np.linspace(0.0, 1.0, KEY_STEPS))
    key = Text(f"colour = {label}: {_number(low)} ")
    for rgba in swatches:
        key.append("  ", style=f"on {colors.to_hex(rgba[:3])}")
    key.append(f" {_number(high)}\nnext: {NEXT_LABEL}; {CELL_TEXT}")
    return key


def _number(value: float) -> str:
    return f"{value:,.3g}"


def _table(trajectory: Trajectory, stat_label: str, columns: range, backgrounds: np.ndarray) -> Table:
    """One table of ``columns`` (token indices within the trajectory)."""
    start = trajectory.start
    table = Table(
        title=f"{lens_label(trajectory.lens_name, trajectory.lens_kind)}, tokens {start + columns.start}-"
        f"{start + columns.stop - 1}: colour = {stat_label}",
        show_lines=False, pad_edge=False, collapse_padding=True, caption_justify="left",
    )  # fmt: skip
    table.add_column("", justify="right", no_wrap=True)
    tokens = trajectory.tokens
    for t in columns:
        table.add_column(fit(tokens[t], CELL_CHARS), justify="center", no_wrap=True, min_width=CELL_CHARS,
                         max_width=CELL_CHARS)  # fmt: skip
    right = model_is_right(trajectory)
    next_row = [Text("next", style="italic")]
    for t in columns:
        next_id = int(trajectory.next_ids[t])
        if right[t] is None:
            next_row.append(Text(""))
        elif right[t]:
            shown = fit(trajectory.token_text[next_id], CELL_CHARS - 1)
            next_row.append(Text(CORRECT_MARK + shown, style="bold green"))
        else:
            next_row.append(Text(fit(trajectory.token_text[next_id], CELL_CHARS), style="dim"))
    table.add_row(*next_row, end_section=True)
    top1 = trajectory.top_k_ids[:, :, 0].tolist()
    labels = row_labels(trajectory)
    for p in reversed(range(trajectory.num_positions)):
        cells = [Text(labels[p])]
        for t in columns:
            cells.append(Text(fit(trajectory.token_text[top1[p][t]], CELL_CHARS), style=_style(backgrounds[p, t])))
        table.add_row(*cells)
    return table


def _style(rgba: np.ndarray) -> str:
    """Rich style with ``rgba`` as background and a readable foreground; no colour where undefined."""
    if rgba[3] == 0:
        return ""
    foreground = "white" if is_dark(rgba) else "black"
    return f"{foreground} on {colors.to_hex(rgba[:3])}"
