"""PNG of causal fidelity: each direction's influence on the lens against its influence on the model, per layer.

Drawn on a bare ``matplotlib.figure.Figure`` (no pyplot, no display) and written atomically.

>>> plot_fidelity(fidelities, alignments, "cbe/fidelity.png", model="gpt2", lens_kind="tuned")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from lenslab.causal.alignment import Alignment
from lenslab.causal.fidelity import Fidelity
from lenslab.plots.palette import kind_color, save_png, short_model_name

_COLUMNS = 4
BELOW_DIAGONAL = (
    "σ: mean KL when one direction is ablated. Points fall below y = x because the directions are chosen to move "
    "the lens most, and the model's later layers partly undo an edit that the lens reads directly."
)
"""Why a reader sees model σ below lens σ, under the figure."""


def plot_fidelity(
    fidelities: list[Fidelity], alignments: list[Alignment], path: str | Path, *, model: str, lens_kind: str
) -> Path:
    """Write ``fidelity_figure`` to the PNG at ``path``; returns the path."""
    return save_png(fidelity_figure(fidelities, alignments, model=model, lens_kind=lens_kind), path)


def fidelity_figure(fidelities: list[Fidelity], alignments: list[Alignment], *, model: str, lens_kind: str) -> Figure:
    """One log-log scatter panel per layer (lens σ on x, model σ on y, as `lenslab cbe`'s table names them;
    y = x dashed; Spearman ρ and the stimulus–response alignment in the panel title)."""
    alignment = {a.layer: a.similarity for a in alignments}
    rows = math.ceil(len(fidelities) / _COLUMNS)
    columns = min(_COLUMNS, len(fidelities))
    figure = Figure(figsize=(3.2 * columns, 3.0 * rows), layout="constrained")
    panels = figure.subplots(rows, columns, squeeze=False).flatten()
    for axes, fidelity in zip(panels, fidelities):
        axes.scatter(fidelity.lens_influence, fidelity.model_influence, s=14, color=kind_color(lens_kind))
        values = [v for v in fidelity.lens_influence + fidelity.model_influence if v > 0]
        if values:  # log axes need positive values; KLs of exactly 0 (no effect) stay off the plot
            low, high = min(values) / 1.5, max(values) * 1.5
            axes.set_xscale("log")
            axes.set_yscale("log")
            axes.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1, label="y = x")
            axes.set_xlim(low, high)
            axes.set_ylim(low, high)
            for axis in (axes.xaxis, axes.yaxis):  # labelled minor ticks of a narrow log range overlap
                axis.set_minor_formatter(NullFormatter())
        rho = "n/a" if fidelity.spearman is None else f"{fidelity.spearman:.2f}"
        aligned = f", align {alignment[fidelity.layer]:.2f}" if fidelity.layer in alignment else ""
        axes.set_title(f"layer {fidelity.layer}: ρ = {rho}{aligned}", fontsize=9)
        axes.set_xlabel("lens σ (nats)", fontsize=8)
        axes.set_ylabel("model σ (nats)", fontsize=8)
        axes.grid(alpha=0.3)
    for axes in panels[len(fidelities) :]:
        axes.set_visible(False)
    k = len(fidelities[0].lens_influence)
    figure.suptitle(f"{short_model_name(model)}: causal fidelity of the {lens_kind} lens's {k} most influential "
                    "directions per layer")  # fmt: skip
    figure.supxlabel(BELOW_DIAGONAL, fontsize=8, wrap=True)
    return figure
