"""PNG figures of an evaluation: per-layer curves in the tuned lens paper's style, and transfer heatmaps.

Figures are drawn on a bare ``matplotlib.figure.Figure`` (no pyplot), so nothing depends on a display or on
global figure state, and written atomically (``lenslab.plots.palette.save_png``). Each lens
kind has its colour of ``lenslab.plots.palette``; lenses of one kind differ by line style and label.

>>> plot_curves(result, "eval.png")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colors
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from lenslab.errors import LensLabError
from lenslab.evaluate import EvalResult
from lenslab.plots.palette import (
    MODEL_COLOR,
    kind_color,
    lens_label,
    lens_styles,
    save_png,
    short_model_name,
)  # fmt: skip

_UNIT_LABELS = {"bits-per-byte": "bits per byte", "nats": "nats per token"}
TRANSFER_COLORMAP = "viridis_r"
"""Bright where a translator's prediction is close to the model's (low KL), as in the trajectory pictures."""


def plot_curves(result: EvalResult, path: str | Path, *, units: str = "bits-per-byte") -> Path:
    """Write ``curves_figure`` to the PNG at ``path``; returns the path."""
    return save_png(curves_figure(result, units=units), path)


def curves_figure(result: EvalResult, *, units: str = "bits-per-byte") -> Figure:
    """Four panels against lens position, one line per lens.

    Cross-entropy against the next token and entropy of the prediction (the model's own as a dashed line),
    KL(p_final ‖ p_lens) on a log axis (it falls by orders of magnitude over depth; 0 at the output, which a log
    axis leaves out), and top-1 agreement with the model. Values in ``units`` ("bits-per-byte" or "nats").
    """
    factor = result.unit_factor(units)
    unit = _UNIT_LABELS[units]
    positions = np.arange(len(result.layers))
    figure = Figure(figsize=(9, 6.5), layout="constrained")
    (ce_axes, kl_axes), (entropy_axes, top1_axes) = figure.subplots(2, 2, sharex=True)
    for name, style in lens_styles(result.kinds).items():
        metrics = result.lenses[name]
        line = {"color": style.color, "linestyle": style.linestyle, "marker": ".", "label": style.label}
        ce_axes.plot(positions, np.multiply(metrics.ce, factor), **line)
        kl = np.multiply(metrics.kl, factor)
        kl_axes.plot(positions, np.where(kl > 0, kl, np.nan), **line)
        entropy_axes.plot(positions, np.multiply(metrics.entropy, factor), **line)
        top1_axes.plot(positions, metrics.top1_agreement, **line)
    model_line = {"color": MODEL_COLOR, "linestyle": "--", "linewidth": 1, "label": "model output"}
    ce_axes.axhline(result.final_ce * factor, **model_line)
    entropy_axes.axhline(result.final_entropy * factor, **model_line)
    kl_axes.set_yscale("log")
    top1_axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    top1_axes.set_ylim(0, 1.02)
    for axes, title in [
        (ce_axes, f"cross-entropy, {unit}"),
        (kl_axes, f"KL(final ‖ lens), {unit}, log scale"),
        (entropy_axes, f"entropy of the prediction, {unit}"),
        (top1_axes, "top-1 agreement with the model"),
    ]:
        axes.set_title(title, fontsize="medium")
        axes.grid(alpha=0.3)
        _layer_ticks(axes, result.layers)
    for axes in (entropy_axes, top1_axes):
        axes.set_xlabel("layer (0 = embeddings)")
    ce_axes.legend(fontsize="small")
    figure.suptitle(f"{short_model_name(result.model)}: {result.tokens:,} held-out tokens")
    return figure


def plot_transfer(result: EvalResult, path: str | Path, *, units: str = "bits-per-byte") -> Path:
    """Write ``transfer_figure`` to the PNG at ``path``; returns the path."""
    return save_png(transfer_figure(result, units=units), path)


def transfer_figure(result: EvalResult, *, units: str = "bits-per-byte") -> Figure:
    """A heatmap of KL(final ‖ translator i at position j) per lens in ``result.transfer``.

    All panels share one logarithmic colour scale, so equal colours mean equal KL across lenses; a cell of KL 0
    (the identity at the output, which is the model itself) is left white.
    """
    if not result.transfer:
        raise LensLabError("The evaluation holds no transfer matrix to plot; evaluate with --transfer.")
    factor = result.unit_factor(units)
    matrices = {name: np.multiply(matrix.kl, factor) for name, matrix in result.transfer.items()}
    positive = np.concatenate([m[m > 0] for m in matrices.values()])
    norm = colors.LogNorm(vmin=positive.min(), vmax=positive.max())
    figure = Figure(figsize=(4.2 * len(matrices) + 1.2, 4.4), layout="constrained")
    panels = figure.subplots(1, len(matrices), squeeze=False, sharey=True)[0]
    for axes, (name, matrix) in zip(panels, matrices.items()):
        image = axes.imshow(np.ma.masked_less_equal(matrix, 0), cmap=TRANSFER_COLORMAP, norm=norm, origin="lower")
        _layer_ticks(axes, result.layers)
        _layer_ticks(axes, result.layers, axis="y")
        axes.set_xlabel("applied at layer (0 = embeddings)")
        kind = result.kinds[name]
        axes.set_title(lens_label(name, kind), fontsize="medium", color=kind_color(kind), fontweight="bold")
    panels[0].set_ylabel("translator of layer (last = identity)")
    figure.colorbar(image, ax=list(panels), label=f"KL(final ‖ lens), {_UNIT_LABELS[units]}, log scale")
    figure.suptitle(f"{short_model_name(result.model)}: each translator applied at every layer")
    return figure


def _layer_ticks(axes, layers: list[str], axis: str = "x") -> None:
    """Integer ticks for lens positions, 0 being the embeddings."""
    step = max(1, len(layers) // 12)
    (axes.set_xticks if axis == "x" else axes.set_yticks)(range(0, len(layers), step))
