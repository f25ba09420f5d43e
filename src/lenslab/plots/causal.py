"""PNG of causal fidelity: each direction's influence on the lens against its influence on the model, per layer.

Drawn on a bare ``matplotlib.figure.Figure`` (no pyplot, no display) and written atomically.

>>> plot_fidelity(fidelities, alignments, "cbe/fidelity.png", title="gpt2, tuned lens")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from lenslab.artifacts import atomic_write
from lenslab.causal.alignment import Alignment
from lenslab.causal.fidelity import Fidelity

_DPI = 150
_COLUMNS = 4


def plot_fidelity(
    fidelities: list[Fidelity], alignments: list[Alignment], path: str | Path, *, title: str = ""
) -> Path:
    """Write one log-log scatter panel per layer (lens influence on x, model influence on y, the diagonal dashed,
    Spearman ρ and the stimulus–response alignment in the panel title) to the PNG at ``path``; returns it."""
    alignment = {a.layer: a.similarity for a in alignments}
    rows = math.ceil(len(fidelities) / _COLUMNS)
    columns = min(_COLUMNS, len(fidelities))
    figure = Figure(figsize=(3.2 * columns, 3.0 * rows), layout="constrained")
    panels = figure.subplots(rows, columns, squeeze=False).flatten()
    for axes, fidelity in zip(panels, fidelities):
        axes.scatter(fidelity.lens_influence, fidelity.model_influence, s=14)
        values = [v for v in fidelity.lens_influence + fidelity.model_influence if v > 0]
        if values:  # log axes need positive values; KLs of exactly 0 (no effect) stay off the plot
            low, high = min(values) / 1.5, max(values) * 1.5
            axes.set_xscale("log")
            axes.set_yscale("log")
            axes.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1)
            axes.set_xlim(low, high)
            axes.set_ylim(low, high)
            for axis in (axes.xaxis, axes.yaxis):  # labelled minor ticks of a narrow log range overlap
                axis.set_minor_formatter(NullFormatter())
        rho = "n/a" if fidelity.spearman is None else f"{fidelity.spearman:.2f}"
        aligned = f", align {alignment[fidelity.layer]:.2f}" if fidelity.layer in alignment else ""
        axes.set_title(f"layer {fidelity.layer}: ρ = {rho}{aligned}", fontsize=9)
        axes.set_xlabel("lens influence (nats)", fontsize=8)
        axes.set_ylabel("model influence (nats)", fontsize=8)
        axes.grid(alpha=0.3)
    for axes in panels[len(fidelities) :]:
        axes.set_visible(False)
    if title:
        figure.suptitle(title)
    path = Path(path)
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=_DPI))
    return path
