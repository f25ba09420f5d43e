"""Session fixtures shared by lenslab's tests: the small trained causal LM of ``support/tiny_lm.py``.

Training takes about half a minute, so the trained model is kept in the pytest cache
(``.pytest_cache/d/lenslab-tiny-lm/<key>``), keyed by the source of ``tiny_lm.py`` and the
torch / transformers / tokenizers versions: a local re-run loads it instantly, while a fresh clone
(CI) or any change to the recipe trains it anew. ``--cache-clear`` forces retraining.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import tokenizers
import torch
import transformers

# Put tests/ on sys.path under any --import-mode, so tests can `from support.tiny_lm import ...`.
sys.path.insert(0, str(Path(__file__).parent))

from support import tiny_lm as tiny_lm_module  # noqa: E402
from support.tiny_lm import METRICS_FILE, TinyLM, load_tiny_lm, train_tiny_lm  # noqa: E402


def _cache_key() -> str:
    """Changes whenever the trained model could: the recipe's source or the libraries that run it."""
    recipe = Path(tiny_lm_module.__file__).read_bytes()
    versions = f"{torch.__version__}|{transformers.__version__}|{tokenizers.__version__}".encode()
    return hashlib.sha256(recipe + versions).hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_lm_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of the trained tiny LM (``save_pretrained`` files plus its training and held-out text)."""
    cache = getattr(request.config, "cache", None)  # None under `-p no:cacheprovider`
    if cache is None:
        return train_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))
    directory = cache.mkdir("lenslab-tiny-lm") / _cache_key()
    # train_tiny_lm writes METRICS_FILE last, so a directory without it holds no usable model.
    if not (directory / METRICS_FILE).exists():
        # Train elsewhere and rename into place, so that sessions sharing this checkout never load
        # a half-written model.
        staging = Path(tempfile.mkdtemp(prefix=f"{directory.name}-", dir=directory.parent))
        train_tiny_lm(staging)
        if (directory / METRICS_FILE).exists():  # another session finished first, with the same model
            shutil.rmtree(staging)
        else:
            shutil.rmtree(directory, ignore_errors=True)  # the remains of an interrupted run, if any
            staging.rename(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_lm(tiny_lm_dir: Path) -> TinyLM:
    """The trained tiny LM: model (eval, float32), tokenizer and the paths of its text files.

    The model is shared by the whole session, so its parameters are frozen (``requires_grad=False``)
    to make an accidental fine-tune fail loudly instead of changing it under later tests; gradients
    still flow through it to inputs and lens parameters. To fine-tune, load a private copy with
    ``load_tiny_lm(tiny_lm.directory)``.
    """
    loaded = load_tiny_lm(tiny_lm_dir)
    loaded.model.requires_grad_(False)
    return loaded
