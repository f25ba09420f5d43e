"""PNG figures of an evaluation: per-layer curves in the tuned lens paper's style, and transfer heatmaps.

Figures are drawn on a bare ``matplotlib.figure.Figure`` (no pyplot), so nothing depends on a display or on
global figure state, and written atomically: a failed run never leaves half a PNG where an old one was.

>>> plot_curves(result, "eval.png")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from lenslab.artifacts import atomic_write
from lenslab.errors import LensLabError
from lenslab.evaluate import EvalResult

_UNIT_LABELS = {"bits-per-byte": "bits per byte", "nats": "nats per token"}
_DPI = 150


def plot_curves(result: EvalResult, path: str | Path, *, units: str = "bits-per-byte") -> Path:
    """Write cross-entropy and KL against lens position, one line per lens, to the PNG at ``path``.

    Left panel: cross-entropy against the next token, with the model's own as a dashed horizontal line.
    Right panel: KL(p_final ‖ p_lens). Values in ``units`` ("bits-per-byte" or "nats"). Returns the path.
    """
    factor = result.unit_factor(units)
    label = _UNIT_LABELS[units]
    positions = range(len(result.layers))
    figure = Figure(figsize=(10, 4), layout="constrained")
    ce_axes, kl_axes = figure.subplots(1, 2)
    for name, metrics in result.lenses.items():
        ce_axes.plot(positions, [value * factor for value in metrics.ce], marker=".", label=_lens_label(name))
        kl_axes.plot(positions, [value * factor for value in metrics.kl], marker=".", label=_lens_label(name))
    ce_axes.axhline(result.final_ce * factor, color="black", linestyle="--", linewidth=1, label="model output")
    ce_axes.set_ylabel(f"cross-entropy ({label})")
    kl_axes.set_ylabel(f"KL(final ‖ lens) ({label})")
    for axes in (ce_axes, kl_axes):
        _layer_axis(axes, result.layers)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"{_display_name(result.model)}: {result.tokens:,} held-out tokens")
    return _save(figure, Path(path))


def plot_transfer(result: EvalResult, path: str | Path, *, units: str = "bits-per-byte") -> Path:
    """Write a heatmap of KL(final ‖ translator i at position j) per lens in ``result.transfer`` to ``path``."""
    if not result.transfer:
        raise LensLabError("The evaluation holds no transfer matrix to plot; evaluate with --transfer.")
    factor = result.unit_factor(units)
    figure = Figure(figsize=(5 * len(result.transfer), 4.4), layout="constrained")
    panels = figure.subplots(1, len(result.transfer), squeeze=False)[0]
    for axes, (name, matrix) in zip(panels, result.transfer.items()):
        image = axes.imshow([[value * factor for value in row] for row in matrix.kl], cmap="viridis", origin="lower")
        figure.colorbar(image, ax=axes, label=f"KL(final ‖ lens) ({_UNIT_LABELS[units]})")
        _layer_axis(axes, result.layers)
        axes.set_xlabel("applied at layer (0 = embeddings)")
        axes.set_ylabel("translator of layer (last = identity)")
        axes.set_title(f"{_display_name(result.model)}: {_lens_label(name)}", fontsize="medium")
    return _save(figure, Path(path))


def _display_name(model: str) -> str:
    """A hub id as it is; a local path by its last component, which is what tells models apart."""
    path = Path(model)
    return path.name if path.exists() else model


def _lens_label(name: str) -> str:
    return {"logit": "logit lens", "tuned": "tuned lens"}.get(name, name)


def _layer_axis(axes, layers: list[str]) -> None:
    """Integer ticks for lens positions, 0 being the embeddings."""
    axes.set_xlabel("layer (0 = embeddings)")
    step = max(1, len(layers) // 12)
    axes.set_xticks(range(0, len(layers), step))


def _save(figure: Figure, path: Path) -> Path:
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=_DPI))
    return path
