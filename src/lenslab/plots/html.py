"""Interactive HTML picture of prediction trajectories (plotly, self-contained, works offline).

One heatmap per lens, side by side on one colour scale: lens positions as rows (the model's output at
the top), input tokens as columns, each cell's most likely next token written in it and coloured by a
statistic of ``lenslab.trajectory.STATISTICS``. Hovering a cell lists the top-k tokens. Above each
column stands the token that really comes next, bold and green with a ✓ where the model's own top-1
prediction is right.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lenslab.artifacts import atomic_write
from lenslab.tokens import visible
from lenslab.trajectory import STATISTICS, Trajectory, value_range

logger = logging.getLogger(__name__)

CELL_WIDTH = 64
"""Pixels per token column."""
CELL_HEIGHT = 26
"""Pixels per lens-position row."""
WIDE_COLUMNS = 500
"""Above this many columns in all, the page gets wider than browsers draw comfortably: a warning suggests slicing."""
CORRECT_COLOR = "#1a7f37"
"""Colour of a next token that the model predicts correctly."""
MISSED_COLOR = "#57606a"


def label(text: str) -> str:
    """Token text as plotly shows it: visible whitespace, and ``<``/``&`` escaped (plotly reads simple HTML)."""
    return html.escape(visible(text), quote=False)


def figure(trajectories: Sequence[Trajectory], stat: str = "entropy") -> go.Figure:
    """The heatmaps of ``trajectories`` (one per lens, same prompt) coloured by ``stat``."""
    statistic = STATISTICS[stat]
    low, high = value_range(trajectories, stat)
    transform = np.log10 if statistic.log_scale else (lambda values: values)
    first = trajectories[0]
    n_positions, n_tokens = first.entropy.shape
    if len(trajectories) * n_tokens > WIDE_COLUMNS:
        logger.warning(
            "%d token columns make a page about %d pixels wide; pass --positions START:END to show fewer",
            len(trajectories) * n_tokens, len(trajectories) * n_tokens * CELL_WIDTH,
        )  # fmt: skip
    fig = make_subplots(
        rows=1, cols=len(trajectories), shared_yaxes=True, horizontal_spacing=0.03,
        subplot_titles=[f"{t.lens_name} lens" for t in trajectories],
    )  # fmt: skip
    marks: list[dict] = []
    for column, trajectory in enumerate(trajectories, start=1):
        values = trajectory.statistic(stat)
        fig.add_trace(
            go.Heatmap(
                z=_nulls(transform(values)),
                x=list(range(n_tokens)),
                y=list(range(n_positions)),
                text=[[label(trajectory.token_text[i]) for i in row] for row in trajectory.top_k_ids[:, :, 0].tolist()],
                texttemplate="%{text}",
                textfont={"size": 11},
                customdata=_hover_texts(trajectory, values, stat),
                hovertemplate="%{customdata}<extra></extra>",
                coloraxis="coloraxis",
                xgap=1,
                ygap=1,
                name=trajectory.lens_name,
            ),
            row=1,
            col=column,
        )
        fig.update_xaxes(
            tickvals=list(range(n_tokens)), ticktext=[label(t) for t in trajectory.tokens], tickangle=-45,
            showgrid=False, row=1, col=column,
        )  # fmt: skip
        axis = "" if column == 1 else str(column)
        marks += _next_token_marks(trajectory, f"x{axis}", f"y{axis}")
    fig.update_yaxes(tickvals=list(range(n_positions)), ticktext=first.row_labels, showgrid=False)
    colorbar = {"title": {"text": statistic.label, "side": "right"}}
    if statistic.log_scale:
        decades = range(0, math.ceil(math.log10(high)) + 1)
        colorbar |= {"tickvals": list(decades), "ticktext": [f"{10**d:,}" for d in decades]}
    fig.update_layout(
        title={"text": f"{html.escape(first.model_name)}: {statistic.label}", "x": 0.01, "y": 0.98,
               "yref": "container", "yanchor": "top"},
        coloraxis={
            "colorscale": statistic.colormap, "cmin": transform(low), "cmax": transform(high), "colorbar": colorbar
        },  # fmt: skip
        width=max(700, len(trajectories) * n_tokens * CELL_WIDTH + 300),
        height=max(420, n_positions * CELL_HEIGHT + 260),
        margin={"t": 160, "b": 110},
        hoverlabel={"align": "left", "font": {"family": "monospace"}},
        plot_bgcolor="white",
    )
    # Subplot titles are annotations too; lift them above the next-token row, below the figure title.
    for title in fig.layout.annotations:
        title.yshift = 75
    # Added at once: fig.add_annotation revalidates all annotations each time, quadratic in prompt length.
    fig.update_layout(annotations=[*fig.layout.annotations, *marks])
    return fig


def html_document(trajectories: Sequence[Trajectory], stat: str = "entropy") -> str:
    """A complete HTML page with plotly.js embedded: no network needed to view it."""
    return figure(trajectories, stat).to_html(include_plotlyjs=True, full_html=True, config={"responsive": False})


def write_html(trajectories: Sequence[Trajectory], path: str | Path, stat: str = "entropy") -> Path:
    """Write ``html_document`` to ``path`` atomically; returns the path."""
    path = Path(path)
    document = html_document(trajectories, stat)
    atomic_write(path, lambda temporary: temporary.write_text(document, encoding="utf-8"))
    return path


def _nulls(values: np.ndarray) -> list[list[float | None]]:
    """NaN -> None, which plotly leaves uncoloured."""
    return [[None if math.isnan(v) else float(v) for v in row] for row in values]


def _hover_texts(trajectory: Trajectory, values: np.ndarray, stat: str) -> list[list[str]]:
    """[P][N] hover text: where, the statistic, the next token's rank and probability, the top-k list."""
    texts = trajectory.token_text
    top_ids, top_probs = trajectory.top_k_ids.tolist(), trajectory.top_k_probs.tolist()
    ranks, probs = trajectory.next_token_rank.tolist(), trajectory.next_token_prob.tolist()
    inputs, nexts = trajectory.tokens, trajectory.next_tokens
    rows = []
    for p, layer in enumerate(trajectory.row_labels):
        row = []
        for t in range(len(inputs)):
            lines = [
                f"<b>{html.escape(layer)}</b>, token {trajectory.start + t}: {label(inputs[t])}",
                f"{STATISTICS[stat].label}: {values[p, t]:.4g}",
                f"entropy {trajectory.entropy[p, t]:.3f}, KL to final {trajectory.kl_to_final[p, t]:.3f}",
            ]
            if nexts[t] is not None:
                lines.append(f"next {label(nexts[t])}: rank {ranks[p][t]}, p={probs[p][t]:.3f}")
            top = zip(top_ids[p][t], top_probs[p][t])
            lines += [f"{k + 1}. {label(texts[i])}  {q:.3f}" for k, (i, q) in enumerate(top)]
            row.append("<br>".join(lines))
        rows.append(row)
    return rows


def _next_token_marks(trajectory: Trajectory, xref: str, yref: str) -> list[dict]:
    """Annotations above each column with the true next token, marked where the model's top-1 is right."""
    output_top1 = trajectory.top_k_ids[-1, :, 0].tolist()
    top = trajectory.num_positions - 0.5
    marks = []
    for t, (next_id, predicted) in enumerate(zip(trajectory.next_ids.tolist(), output_top1)):
        if next_id < 0:
            continue
        correct = next_id == predicted
        text = label(trajectory.token_text[next_id])
        marks.append(
            dict(
                x=t, y=top, xref=xref, yref=yref, yanchor="bottom", showarrow=False, textangle=-45,
                text=f"<b>✓{text}</b>" if correct else text,
                font={"color": CORRECT_COLOR if correct else MISSED_COLOR, "size": 11},
            )
        )  # fmt: skip
    return marks
