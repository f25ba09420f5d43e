"""Interactive HTML picture of prediction trajectories (plotly, self-contained, works offline).

The grid of ``lenslab.plots.grid`` as heatmaps on one colour scale (``lenslab.plots.scales``), the figure as wide
as the browser window: a prompt wraps into bands of ``TOKENS_PER_BAND`` columns, so cells stay readable however
long it is, and the page grows downwards. Hovering a cell lists each of its numbers once (the coloured one in bold)
and the top-k tokens.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lenslab.io import GENERATOR, atomic_write
from lenslab.plots import grid
from lenslab.plots.palette import kind_color, short_model_name
from lenslab.plots.scales import STATISTICS, statistic_label, value_range
from lenslab.tokens import visible
from lenslab.trajectory import Trajectory

TOKENS_PER_BAND = 20
"""Token columns per band: about 60 pixels a cell in a 1,300-pixel window."""
CELL_HEIGHT = 26
"""Pixels per lens-position row."""
PANEL_GAP = 70
"""Pixels above each panel for its title and the true next tokens, and below it for the input tokens."""
FRAME = 150
"""Pixels above the first panel (title, legend) and below the last one."""
CELL_CHARS = 10
"""Longest token text shown in a cell or a column label; the hover text has it whole."""


def label(text: str) -> str:
    """Token text as plotly shows it: visible whitespace, and ``<``/``&`` escaped (plotly reads simple HTML)."""
    return html.escape(visible(text), quote=False)


def page_height(trajectories: Sequence[Trajectory]) -> int:
    """Pixels: one panel per lens and band of tokens, one under the other."""
    n_positions, n_tokens = trajectories[0].entropy.shape
    panels = len(trajectories) * math.ceil(n_tokens / TOKENS_PER_BAND)
    return panels * (n_positions * CELL_HEIGHT + PANEL_GAP) + FRAME


def figure(trajectories: Sequence[Trajectory], stat: str = "entropy") -> go.Figure:
    """The heatmaps of ``trajectories`` (one per lens and band, same prompt) coloured by ``stat``."""
    statistic = STATISTICS[stat]
    low, high = value_range(trajectories, stat)
    transform = np.log10 if statistic.log_scale else (lambda values: values)
    first = trajectories[0]
    bands = grid.token_bands(first.entropy.shape[1], TOKENS_PER_BAND)
    hovers = [_hover_texts(trajectory, stat) for trajectory in trajectories]
    panels = [(band, trajectory, hover) for band in bands for trajectory, hover in zip(trajectories, hovers)]
    height = page_height(trajectories)
    fig = make_subplots(
        rows=len(panels), cols=1, vertical_spacing=PANEL_GAP / height,
        subplot_titles=[_colored(grid.panel_title(t, band, len(bands)), t.lens_kind) for band, t, _ in panels],
    )  # fmt: skip
    marks: list[dict] = []
    rows = list(range(first.num_positions))
    for row, (band, trajectory, hover) in enumerate(panels, start=1):
        columns = slice(band.start, band.stop)
        fig.add_trace(
            go.Heatmap(
                z=_nulls(transform(trajectory.statistic(stat)[:, columns])),
                x=list(range(len(band))),
                y=rows,
                text=[
                    [label(grid.fit(trajectory.token_text[i], CELL_CHARS)) for i in row_ids[columns]]
                    for row_ids in trajectory.top_k_ids[:, :, 0].tolist()
                ],  # fmt: skip
                texttemplate="%{text}",
                textfont={"size": 11},
                customdata=[cells[columns] for cells in hover],
                hovertemplate="%{customdata}<extra></extra>",
                coloraxis="coloraxis",
                xgap=1,
                ygap=1,
                name=trajectory.lens_name,
            ),
            row=row,
            col=1,
        )
        fig.update_xaxes(
            tickvals=list(range(len(band))), ticktext=[label(grid.fit(trajectory.tokens[t], CELL_CHARS)) for t in band],
            range=[-0.5, TOKENS_PER_BAND - 0.5] if len(bands) > 1 else None, showgrid=False, row=row, col=1,
        )  # fmt: skip
        axis = "" if row == 1 else str(row)
        marks += _next_token_marks(trajectory, band, f"x{axis}", f"y{axis}")
    fig.update_yaxes(tickvals=rows, ticktext=grid.row_labels(first), showgrid=False)
    colorbar = {"title": {"text": html.escape(statistic_label(first, stat)), "side": "right"}, "len": 0.5, "y": 1,
                "yanchor": "top"}  # fmt: skip
    if statistic.log_scale:
        decades = range(0, math.ceil(math.log10(high)) + 1)
        colorbar |= {"tickvals": list(decades), "ticktext": [f"{10**d:,}" for d in decades]}
    title = f"{html.escape(short_model_name(first.model_name))}: {html.escape(statistic_label(first, stat))}"
    fig.update_layout(
        title={
            "text": f"{title}<br><sup>rows: lens positions; {grid.CELL_TEXT}; above: {grid.NEXT_LABEL}</sup>",
            "x": 0.01,
            "y": 0.995,
            "yref": "container",
            "yanchor": "top",
        },
        coloraxis={
            "colorscale": statistic.colormap,
            "cmin": transform(low),
            "cmax": transform(high),
            "colorbar": colorbar,
        },  # fmt: skip
        autosize=True,
        height=height,
        margin={"t": 110, "b": 40, "l": 130, "r": 40},
        hoverlabel={"align": "left", "font": {"family": "monospace"}},
        plot_bgcolor="white",
    )
    # Subplot titles are annotations too; lift them above the next-token row.
    for panel_label in fig.layout.annotations:
        panel_label.yshift = 22
    # Added at once: fig.add_annotation revalidates all annotations each time, quadratic in prompt length.
    fig.update_layout(annotations=[*fig.layout.annotations, *marks])
    return fig


def html_document(trajectories: Sequence[Trajectory], stat: str = "entropy") -> str:
    """A complete HTML page with plotly.js embedded: no network needed to view it; the figure follows the window."""
    page = figure(trajectories, stat).to_html(
        include_plotlyjs=True, full_html=True, default_width="100%", config={"responsive": True}
    )
    return page.replace("<head>", f'<head><meta name="generator" content="{GENERATOR}">', 1)


def write_html(trajectories: Sequence[Trajectory], path: str | Path, stat: str = "entropy") -> Path:
    """Write ``html_document`` to ``path`` atomically; returns the path."""
    path = Path(path)
    document = html_document(trajectories, stat)
    atomic_write(path, lambda temporary: temporary.write_text(document, encoding="utf-8"))
    return path


def _colored(text: str, kind: str) -> str:
    return f'<b><span style="color:{kind_color(kind)}">{html.escape(text)}</span></b>'


def _nulls(values: np.ndarray) -> list[list[float | None]]:
    """NaN -> None, which plotly leaves uncoloured."""
    return [[None if math.isnan(v) else float(v) for v in row] for row in values]


def _hover_texts(trajectory: Trajectory, stat: str) -> list[list[str]]:
    """[P][N] hover text: where, each number of the cell once (the coloured one bold), the top-k list."""
    texts = trajectory.token_text
    top_ids, top_probs = trajectory.top_k_ids.tolist(), trajectory.top_k_probs.tolist()
    ranks, probs = trajectory.next_token_rank.tolist(), trajectory.next_token_prob.tolist()
    entropy, kl = trajectory.entropy.tolist(), trajectory.kl_to_final.tolist()
    inputs, nexts = trajectory.tokens, trajectory.next_tokens
    target = trajectory.statistic("target").tolist() if trajectory.target_ids else None
    target_label = html.escape(statistic_label(trajectory, "target")) if trajectory.target_ids else ""
    rows = []
    for p, layer in enumerate(grid.row_labels(trajectory)):
        row = []
        for t in range(len(inputs)):
            figures = {"entropy": f"entropy {entropy[p][t]:.3f} nats", "kl": f"KL to final {kl[p][t]:.3f} nats"}
            if nexts[t] is not None:
                figures["rank"] = f"next {label(nexts[t])}: rank {ranks[p][t]:,}"
                figures["prob"] = f"p(next) {probs[p][t]:.3f}"
            if target is not None:
                figures["target"] = f"{target_label} = {target[p][t]:.3f}"
            lines = [f"<b>{html.escape(layer)}</b>, token {trajectory.start + t}: {label(inputs[t])}"]
            lines += [f"<b>{text}</b>" if name == stat else text for name, text in figures.items()]
            top = zip(top_ids[p][t], top_probs[p][t])
            lines += [f"{k + 1}. {label(texts[i])}  {q:.3f}" for k, (i, q) in enumerate(top)]
            row.append("<br>".join(lines))
        rows.append(row)
    return rows


def _next_token_marks(trajectory: Trajectory, band: range, xref: str, yref: str) -> list[dict]:
    """Annotations above each column of ``band`` with the true next token, ✓ where the model's top-1 is right."""
    right = grid.model_is_right(trajectory)
    top = trajectory.num_positions - 0.5
    marks = []
    for column, t in enumerate(band):
        if right[t] is None:
            continue
        text = label(grid.fit(trajectory.token_text[int(trajectory.next_ids[t])], CELL_CHARS))
        marks.append(
            dict(
                x=column, y=top, xref=xref, yref=yref, yanchor="bottom", showarrow=False,
                text=f"<b>{grid.CORRECT_MARK}{text}</b>" if right[t] else text,
                font={"color": grid.CORRECT_COLOR if right[t] else grid.MISSED_COLOR, "size": 11},
            )
        )  # fmt: skip
    return marks
