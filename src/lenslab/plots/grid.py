"""The layout every picture of prediction trajectories shares (PNG, HTML, terminal).

A grid per lens: lens positions as rows (the model's output at the top), input tokens as columns, each cell's most
likely next token written in it. Above each column stands the token that really comes next, marked ✓ where the
model's own top-1 prediction is right. A long prompt wraps: its tokens are cut into bands of consecutive columns,
and each band shows every lens, one under the other, so that a column of one lens sits above the same column of
the next.
"""

from __future__ import annotations

from lenslab.plots.palette import lens_label
from lenslab.tokens import visible
from lenslab.trajectory import Trajectory

CORRECT_COLOR = "#1a7f37"
"""Colour of a next token that the model predicts correctly."""
MISSED_COLOR = "#57606a"
"""Colour of a next token that the model gets wrong."""
CORRECT_MARK = "✓"
CELL_TEXT = "cell text: the lens's most likely next token"
NEXT_LABEL = f"true next token ({CORRECT_MARK}: the model's top-1 prediction is right)"
"""What the cell texts and the tokens above the columns are, as every picture's legend says."""


def token_bands(n_tokens: int, per_band: int) -> list[range]:
    """Token columns ``0..n_tokens - 1`` cut into consecutive bands of at most ``per_band``."""
    return [range(first, min(first + per_band, n_tokens)) for first in range(0, n_tokens, per_band)]


def row_labels(trajectory: Trajectory) -> list[str]:
    """The lens positions' names, the last marked as the model's output."""
    return [*trajectory.layers[:-1], f"{trajectory.layers[-1]} (output)"]


def model_is_right(trajectory: Trajectory) -> list[bool | None]:
    """Per column, whether the model's own top-1 prediction is the true next token; None after the prompt."""
    output_top1 = trajectory.top_k_ids[-1, :, 0].tolist()
    return [None if n < 0 else n == top1 for n, top1 in zip(trajectory.next_ids.tolist(), output_top1)]


def panel_title(trajectory: Trajectory, band: range, n_bands: int) -> str:
    """ "tuned lens", or "tuned lens (run-a), tokens 12-23" for a lens named by its folder when the prompt wraps
    (token numbers within the prompt)."""
    title = lens_label(trajectory.lens_name, trajectory.lens_kind)
    if n_bands == 1:
        return title
    return f"{title}, tokens {trajectory.start + band.start}-{trajectory.start + band.stop - 1}"


def fit(text: str, limit: int) -> str:
    """Token text made visible (``lenslab.tokens.visible``) and cut to ``limit`` characters, ending in … if cut."""
    shown = visible(text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"
