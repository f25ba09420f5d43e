"""Transfer: apply a tuned lens trained on a base model to a fine-tuned relative of it.

The tuned lens paper (Belrose et al. 2023) finds that lenses transfer to fine-tuned versions of their model
(e.g. a base model's lens on its chat-tuned version) almost as well as a lens trained on the fine-tuned model,
and far better than its logit lens. A fine-tuned model has a different unembedding, so the lens file's
fingerprint check is relaxed to shapes (same number of layers and residual width); that is logged, and the
result records it.

>>> lenses, note = transfer_lenses(view, "lenses/base")   # doctest: +SKIP
>>> sorted(lenses)                                       # doctest: +SKIP
['base_tuned', 'logit']
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

from lenslab.adapter import ModelView
from lenslab.artifacts import CONFIG_FILE
from lenslab.errors import LensLabError, LensModelMismatch
from lenslab.lens_files import local_path
from lenslab.lenses import Lens, LogitLens, TunedLens

logger = logging.getLogger(__name__)

BASE_TUNED = "base_tuned"
"""Name of the transferred lens (trained on the base model)."""
LOGIT = "logit"
"""Name of the fine-tuned model's logit lens."""
OWN_TUNED = "own_tuned"
"""Name of the fine-tuned model's own tuned lens, when given."""


class TransferLenses(NamedTuple):
    """The lenses to compare on the fine-tuned model, and what was relaxed to load the transferred one."""

    lenses: dict[str, Lens]
    """``BASE_TUNED``, ``LOGIT`` and, when given, ``OWN_TUNED``; all built on the fine-tuned model's view."""
    note: dict
    """JSON-ready record: the transferred lens's directory, its base model, and the relaxed check."""


def transfer_lenses(view: ModelView, lens_dir: str | Path, *, own_lens_dir: str | Path | None = None) -> TransferLenses:
    """Load the base model's lens onto ``view`` (shape check only), beside its logit lens and own tuned lens.

    The own lens, trained on this very model, keeps the full fingerprint check. Either may be a hub reference
    (`lenslab.hub`); the base lens then names its model, e.g. hub:BASE_MODEL_ID.
    """
    base_path = local_path(lens_dir, view)
    transferred = TunedLens.load(base_path, view, check="shapes")
    base = _base_model(base_path)
    model_name = view.model.config.name_or_path or type(view.model).__name__
    message = (
        f"Applying the tuned lens in {lens_dir} (trained on {base}) to {model_name} with the unembedding fingerprint "
        f"check relaxed to shapes ({view.num_layers} layers, width {view.d_model})."
    )
    logger.warning(message)
    lenses: dict[str, Lens] = {BASE_TUNED: transferred, LOGIT: LogitLens(view)}
    if own_lens_dir is not None:
        own_path = local_path(own_lens_dir, view)
        try:
            lenses[OWN_TUNED] = TunedLens.load(own_path, view, check="full")
        except LensModelMismatch:
            # check_compatible's advice (relax the check) is wrong here: this lens must be the model's own.
            raise LensLabError(
                f"The own lens in {own_lens_dir} was trained for another model ({_base_model(own_path)}), not "
                f"{model_name}; pass as --own-lens a lens trained on this model, or leave it out."
            ) from None
    note = {"lens": str(lens_dir), "base_model": base, "check": "shapes", "message": message}
    return TransferLenses(lenses, note)


def _base_model(lens_dir: str | Path) -> str:
    """The model a lens's config (already validated by ``TunedLens.load``) names, in lenslab or tuned-lens layout."""
    raw = json.loads((Path(lens_dir) / CONFIG_FILE).read_text())
    return raw.get("base_model") or raw.get("base_model_name_or_path") or "an unrecorded model"
