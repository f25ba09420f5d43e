"""lenslab: see what every layer of a transformer predicts."""

__version__ = "0.1.0"
