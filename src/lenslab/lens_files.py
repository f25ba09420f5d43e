"""Any lens, whatever its kind: a lenslab folder, a tuned-lens folder, or a Jacobian-lens `.pt` file, on disk or on
the Hugging Face Hub (`lenslab.hub`, whose local copy then loads like any other).

lens = load_lens("runs/my-lens", view)       # kind from the folder's config.json
lens = load_lens("jlens/gpt2.pt", view)      # the published J-lens artifact
lens = load_lens("hub", view)                # the tuned-lens zoo's lens for the model's hub id
lens = load_lens("hf://owner/repo/gpt2", view)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lenslab import hub
from lenslab.adapter import ModelView
from lenslab.errors import LensLabError
from lenslab.jacobian import JacobianLens, read_jacobian_artifact
from lenslab.lenses import Lens, LinearLens, StoredLens, TunedLens

logger = logging.getLogger(__name__)

LENS_KINDS: dict[str, type[StoredLens]] = {kind.kind: kind for kind in (TunedLens, LinearLens, JacobianLens)}
"""The lens folder's `kind` -> the class that loads it."""


def lens_kind(path: str | Path) -> str:
    """The kind of lens at `path` ("tuned", "linear", "jacobian", ...), read without loading its tensors; a hub
    folder of unknown kind is downloaded (`hub.resolve`) to read it."""
    if hub.is_reference(path):
        reference = hub.parse(str(path))
        if reference.kind is not None:
            return reference.kind
        path = hub.resolve(str(path))
    path = Path(path)
    if path.is_file():
        return "jacobian"  # the only lens that is one file: the J-lens artifact
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "tuned"  # the loader names what is wrong with the folder
    # tuned-lens's own config.json has no kind: its lenses are all tuned lenses.
    kind = config.get("kind", "tuned") if isinstance(config, dict) else "tuned"
    return kind if isinstance(kind, str) else "tuned"


def local_path(lens: str | Path, view: ModelView) -> Path:
    """The path of a local lens, or the local copy of a hub lens (`lenslab.hub.resolve`) for `view`'s model."""
    if hub.is_reference(lens):
        return hub.resolve(str(lens), view.model.config.name_or_path)
    return Path(lens)


def load_lens(path: str | Path, view: ModelView, *, check: str = "full") -> Lens:
    """Load the lens at `path` (or the hub lens it names) for `view`'s model, refusing one made for another model
    (see `TunedLens.load`).

    A J-lens artifact records no fingerprint of its model, only the residual width, so a model of the same width
    cannot be told apart from the right one: a warning says so.
    """
    path = local_path(path, view)
    if not path.exists():
        raise LensLabError(
            f"No lens found at {path}: nothing is there; pass a lens folder or a Jacobian-lens .pt file."
        )
    kind = lens_kind(path)
    if kind == "jacobian" and path.is_file():
        lens = read_jacobian_artifact(path, view)
        if check == "full":
            logger.warning(
                "The Jacobian lens %s records only its residual width, so lenslab cannot check that it was "
                "fitted for this model; make sure it was.", path,
            )  # fmt: skip
        return lens
    if kind not in LENS_KINDS:
        raise LensLabError(
            f"The lens in {path} is of kind {kind!r}, which this lenslab cannot load (it reads "
            f"{', '.join(LENS_KINDS)}); upgrade lenslab or pass another lens."
        )
    return LENS_KINDS[kind].load(path, view, check=check)
