"""Terminal view of prediction trajectories (rich), for a quick look over SSH.

The same grid as the pictures: lens positions as rows (the model's output at the top), input tokens as
columns, each cell's top-1 token on a background coloured by the statistic. A header row gives the true
next token, ✓ where the model's own top-1 prediction is right. Prompts wider than the terminal are cut
into several tables of consecutive columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps, colors
from rich.table import Table
from rich.text import Text

from lenslab.plots.png import color_norm, is_dark
from lenslab.tokens import visible
from lenslab.trajectory import STATISTICS, Trajectory, value_range

CELL_CHARS = 8
"""Longest token text shown in a cell; longer ones end in …."""


def tables(trajectories: Sequence[Trajectory], stat: str = "entropy", width: int = 120) -> list[Table]:
    """Rich tables for ``trajectories`` coloured by ``stat``, each at most about ``width`` characters wide."""
    statistic = STATISTICS[stat]
    norm = color_norm(stat, value_range(trajectories, stat))
    cmap = colormaps[statistic.colormap]
    label_width = max(len(label) for label in trajectories[0].row_labels)
    # Each column takes its cell text plus rich's padding and border (3 characters).
    per_table = max(1, (width - label_width - 4) // (CELL_CHARS + 3))
    n_tokens = trajectories[0].entropy.shape[1]
    result = []
    for trajectory in trajectories:
        backgrounds = cmap(norm(trajectory.statistic(stat)))  # [P, N, 4]; undefined cells transparent
        for first in range(0, n_tokens, per_table):
            columns = range(first, min(first + per_table, n_tokens))
            result.append(_table(trajectory, statistic.label, columns, backgrounds))
    return result


def _table(trajectory: Trajectory, stat_label: str, columns: range, backgrounds: np.ndarray) -> Table:
    """One table of ``columns`` (token indices within the trajectory)."""
    start = trajectory.start
    table = Table(
        title=f"{trajectory.lens_name} lens, tokens {start + columns.start}-{start + columns.stop - 1}: "
        f"colour = {stat_label}",
        show_lines=False, pad_edge=False, collapse_padding=True,
    )  # fmt: skip
    table.add_column("", justify="right", no_wrap=True)
    tokens = trajectory.tokens
    for t in columns:
        table.add_column(_fit(tokens[t]), justify="center", no_wrap=True, min_width=CELL_CHARS, max_width=CELL_CHARS)
    output_top1 = trajectory.top_k_ids[-1, :, 0].tolist()
    next_row = [Text("next", style="italic")]
    for t in columns:
        next_id = int(trajectory.next_ids[t])
        if next_id < 0:
            next_row.append(Text(""))
        elif next_id == output_top1[t]:
            next_row.append(Text("✓" + _fit(trajectory.token_text[next_id], CELL_CHARS - 1), style="bold green"))
        else:
            next_row.append(Text(_fit(trajectory.token_text[next_id]), style="dim"))
    table.add_row(*next_row, end_section=True)
    top1 = trajectory.top_k_ids[:, :, 0].tolist()
    for p in reversed(range(trajectory.num_positions)):
        cells = [Text(trajectory.row_labels[p])]
        for t in columns:
            cells.append(Text(_fit(trajectory.token_text[top1[p][t]]), style=_style(backgrounds[p, t])))
        table.add_row(*cells)
    return table


def _fit(text: str, limit: int = CELL_CHARS) -> str:
    shown = visible(text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def _style(rgba: np.ndarray) -> str:
    """Rich style with ``rgba`` as background and a readable foreground; no colour where undefined."""
    if rgba[3] == 0:
        return ""
    foreground = "white" if is_dark(rgba) else "black"
    return f"{foreground} on {colors.to_hex(rgba[:3])}"
