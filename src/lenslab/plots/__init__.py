"""Pictures of results: PNG figures with matplotlib (``curves``).

>>> from lenslab.plots import plot_curves, plot_transfer  # doctest: +SKIP
"""

from lenslab.plots.curves import plot_curves, plot_transfer

__all__ = ["plot_curves", "plot_transfer"]
