"""How the trajectory pictures (PNG, HTML, terminal) colour a statistic of ``Trajectory.statistic``.

Every renderer reads the same table (``STATISTICS``), range (``value_range``) and normalisation (``color_norm``),
so a cell has one colour whichever way it is drawn, and several lenses share one scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from matplotlib import colors

from lenslab.tokens import visible
from lenslab.trajectory import Trajectory


class Statistic(NamedTuple):
    """How one per-cell statistic is coloured."""

    label: str
    """Colour-bar title."""
    colormap: str
    """Colour map name understood by both matplotlib and plotly; bright means confident or close to final."""
    log_scale: bool = False
    """Colour by log10 of the value (ranks span 1 .. vocab)."""
    diverging: bool = False
    """Centre the colour range at 0 (target scores)."""


STATISTICS: dict[str, Statistic] = {
    "entropy": Statistic("entropy (nats)", "viridis_r"),
    "prob": Statistic("probability of the next token", "viridis"),
    "rank": Statistic("rank of the next token", "viridis_r", log_scale=True),
    "kl": Statistic("KL(final ‖ lens), nats", "viridis_r"),
    "target": Statistic("log p(target) − log p(anti-target)", "RdBu", diverging=True),
}
"""Colouring of each of ``lenslab.trajectory.STATISTIC_NAMES``, in that order."""


def statistic_label(trajectory: Trajectory, stat: str) -> str:
    """The colour-bar title of ``stat``; the target score names its tokens, and the anti-target only if given."""
    if stat != "target":
        return STATISTICS[stat].label

    def tokens(ids: Sequence[int]) -> str:
        return " + ".join(f"'{visible(trajectory.token_text[i])}'" for i in ids)

    label = f"log p({tokens(trajectory.target_ids)})"
    return f"{label} − log p({tokens(trajectory.anti_target_ids)})" if trajectory.anti_target_ids else label


def value_range(trajectories: Sequence[Trajectory], stat: str) -> tuple[float, float]:
    """One colour range for ``stat`` across ``trajectories``, so several lenses share a scale."""
    values = np.concatenate([t.statistic(stat).ravel() for t in trajectories])
    values = values[np.isfinite(values)]
    if stat == "prob":
        return 0.0, 1.0
    if stat == "rank":
        return 1.0, float(max(values.max(initial=1.0), 10.0))
    if STATISTICS[stat].diverging:
        bound = float(np.abs(values).max(initial=0.0)) or 1.0
        return -bound, bound
    return 0.0, float(values.max(initial=0.0)) or 1.0


def color_norm(stat: str, value_range: tuple[float, float]) -> colors.Normalize:
    """The matplotlib normalisation of ``stat`` over ``value_range`` (log for ranks, centred for scores)."""
    low, high = value_range
    statistic = STATISTICS[stat]
    if statistic.log_scale:
        return colors.LogNorm(vmin=max(low, 1.0), vmax=high)
    if statistic.diverging:
        return colors.TwoSlopeNorm(vcenter=0.0, vmin=low, vmax=high)
    return colors.Normalize(vmin=low, vmax=high)


def is_dark(rgba: Sequence[float]) -> bool:
    """Whether text on this background should be white: relative luminance below one half, and opaque
    (the colour map's transparent "bad" colour over an undefined cell shows the white page)."""
    red, green, blue, alpha = rgba
    return alpha > 0 and 0.2126 * red + 0.7152 * green + 0.0722 * blue < 0.5
