"""lenslab: see what every layer of a transformer predicts.

>>> from lenslab import load_model, LogitLens, TunedLens  # doctest: +SKIP
>>> model, tokenizer = load_model("gpt2")                 # doctest: +SKIP
>>> lens = TunedLens.from_model(model)                    # untrained: equal to the logit lens
"""

from importlib import import_module

__version__ = "0.1.0"

# Public name -> module. Imported on first use so that `lenslab --help` starts without loading torch.
_PUBLIC = {
    "ModelView": "lenslab.adapter",
    "LensLabError": "lenslab.errors",
    "Lens": "lenslab.lenses",
    "LogitLens": "lenslab.lenses",
    "TunedLens": "lenslab.lenses",
    "load_lens": "lenslab.lens_files",
    "load_model": "lenslab.loading",
    "Trajectory": "lenslab.trajectory",
    "TrajectoryConfig": "lenslab.trajectory",
    "TrainConfig": "lenslab.train",
    "train_lens": "lenslab.train",
    "evaluate_lenses": "lenslab.evaluate",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'lenslab' has no attribute {name!r}")
