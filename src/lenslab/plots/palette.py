"""What every figure shares: one colour per lens kind, readable lens names, models named by their short name,
and how a PNG is written.

The colours are the Okabe–Ito palette, told apart by colour-blind readers too. A figure that shows several lenses
of one kind (two tuned lenses from two folders, or a base model's tuned lens beside the model's own) keeps the
kind's colour and tells them apart by line style and label.

>>> lens_label("base_tuned", "tuned"), lens_label("run-a", "jacobian"), short_model_name("/models/austen-gpt2-6l/")
("base model's tuned lens", 'jacobian lens (run-a)', 'austen-gpt2-6l')
"""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import NamedTuple

from matplotlib.figure import Figure

from lenslab.applications.transfer import BASE_TUNED, OWN_TUNED
from lenslab.io import GENERATOR, atomic_write

KIND_COLORS = {"logit": "#E69F00", "tuned": "#0072B2", "linear": "#009E73", "jacobian": "#CC79A7"}
"""Colour of each lens kind (``Lens.kind``); kinds not listed take ``OTHER_COLOR``."""
OTHER_COLOR = "#56B4E9"
MODEL_COLOR = "black"
"""The model's own output, drawn as a reference line."""
LINE_STYLES = ("-", "--", ":", "-.")
"""Line style of the first, second, ... lens of one kind in a figure."""
DPI = 150
"""Resolution of every PNG: sharp when a page shows the figure at its drawn size."""
_LABELS = {BASE_TUNED: "base model's tuned lens", OWN_TUNED: "own tuned lens"}
"""`lenslab transfer`'s lens names, spelled out."""


class LensStyle(NamedTuple):
    """How one lens is drawn in a line plot."""

    color: str
    linestyle: str
    label: str


def kind_color(kind: str) -> str:
    """The colour of lens kind ``kind`` ("logit", "tuned", ...)."""
    return KIND_COLORS.get(kind, OTHER_COLOR)


def lens_label(name: str, kind: str) -> str:
    """A lens, named `name`, of kind `kind`, as a legend says it: "logit lens", "tuned lens (folder)", ..."""
    if name in _LABELS:
        return _LABELS[name]
    return f"{kind} lens" if name == kind else f"{kind} lens ({name})"


def lens_styles(kinds: dict[str, str]) -> dict[str, LensStyle]:
    """Colour by kind, then line style by order within the kind, and label of each lens, from {name: kind}
    (`EvalResult.kinds`)."""
    seen: dict[str, int] = {}
    styles = {}
    for name, kind in kinds.items():
        index = seen[kind] = seen.get(kind, -1) + 1
        styles[name] = LensStyle(kind_color(kind), LINE_STYLES[index % len(LINE_STYLES)], lens_label(name, kind))
    return styles


def short_model_name(model: str) -> str:
    """The last part of a hub id or a local path, which is what tells models apart in a title:
    "HuggingFaceTB/SmolLM2-135M-Instruct" -> "SmolLM2-135M-Instruct"."""
    return PurePath(model.rstrip("/\\")).name or model


def save_png(figure: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write ``figure`` to ``path`` as PNG atomically: a failed run never leaves half a PNG where an old one was."""
    path = Path(path)
    signed = {"Software": f"{GENERATOR} (Matplotlib)"}
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=dpi, metadata=signed))
    return path
