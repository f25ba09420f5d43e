"""Pictures of results.

- ``curves``: PNG figures of an evaluation (``lenslab eval``): per-layer curves and transfer heatmaps;
- ``png``, ``html``, ``terminal``: prediction trajectories as a PNG grid, interactive HTML and rich tables;
- ``causal``: the causal-fidelity scatter of ``lenslab cbe``;
- ``depth``: the prediction-depth table and histogram of ``lenslab depth``.

The evaluation figures are re-exported here; the others are imported from their modules.

>>> from lenslab.plots import plot_curves, plot_transfer  # doctest: +SKIP
"""

from lenslab.plots.curves import plot_curves, plot_transfer

__all__ = ["plot_curves", "plot_transfer"]
