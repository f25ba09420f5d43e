"""Lenses on the Hugging Face Hub: what a hub reference names, and the local copy of it `huggingface_hub` keeps.

    hub                                  the tuned-lens zoo's lens for the model's hub id
    hub:EleutherAI/pythia-160m-deduped   the zoo's lens for that model
    hf://OWNER/REPO                      a lens at the root of a model repository
    hf://OWNER/REPO/SUBFOLDER@REVISION   a lens folder in it, at a branch, tag or commit
    hf://OWNER/REPO/gpt2.pt              a Jacobian-lens .pt file in it

The zoo is the `tuned-lens` package's: the space `AlignmentResearch/tuned-lens`, one folder per model under `lens/`
named by its hub id (`lens/gpt2`, `lens/EleutherAI/pythia-160m-deduped`), each with `config.json` and `params.pt`.
`resolve` downloads only a lens's own files (never a model's weights or a training run's checkpoints beside them)
into the hub's cache, where `HF_HUB_OFFLINE=1` finds them again with no network, and returns the local path, which
`lenslab.lens_files.load_lens` then loads like any local lens: `weights_only`, fingerprint and name checks included.
Nothing from the hub is imported or run. Torch-free, so that `lenslab.specs` can check a reference's spelling while
the flags are parsed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lenslab.errors import LensLabError
from lenslab.model_source import HUB_ID, _is_network_error, hub_offline, is_hub_id

ZOO_REPO = "AlignmentResearch/tuned-lens"
"""The hub space of the tuned-lens package's published lenses."""
ZOO_FOLDER = "lens"
"""The space's folder holding one lens folder per model hub id."""
ZOO_URL = f"https://huggingface.co/spaces/{ZOO_REPO}/tree/main/{ZOO_FOLDER}"
LENS_FILES = ("config.json", "params.safetensors", "params.pt")
"""A lens folder's files, lenslab's or tuned-lens's layout; nothing else in the folder is downloaded."""
JACOBIAN_SUFFIX = ".pt"
"""A reference to a file with this suffix names a Jacobian-lens artifact rather than a folder."""
_ZOO = re.compile(r"hub(?::(?P<name>[^@]+))?(?:@(?P<revision>.+))?")
_REPOSITORY = re.compile(r"hf://(?P<repo>[^/@]+/[^/@]+)(?:/(?P<path>[^@]*?))?/?(?:@(?P<revision>.+))?")
_FORMS = "hub, hub:MODEL, or hf://OWNER/REPO[/SUBFOLDER][@REVISION]"


@dataclass(frozen=True)
class HubLens:
    """Where on the hub a reference points: a folder or a `.pt` file in a repository, at a revision."""

    reference: str
    """The reference as written, e.g. "hub" or "hf://owner/lenses/gpt2@v1"."""
    repo_id: str
    """OWNER/NAME of the repository."""
    repo_type: str
    """"model", or "space" for the tuned-lens zoo."""
    path: str | None
    """The lens folder ("" for the repository's root) or `.pt` file inside the repository; None for `hub` until the
    model's hub id is known (`for_model`)."""
    revision: str | None
    """Branch, tag or commit; None: the main branch."""

    @property
    def zoo(self) -> bool:
        """Whether this is an entry of the tuned-lens zoo (always a tuned lens)."""
        return self.repo_id == ZOO_REPO and self.repo_type == "space"

    @property
    def is_file(self) -> bool:
        """Whether the reference names a Jacobian-lens `.pt` file rather than a lens folder."""
        return self.path is not None and self.path.endswith(JACOBIAN_SUFFIX)

    @property
    def kind(self) -> str | None:
        """The lens's kind when the reference alone tells it ("tuned" in the zoo, "jacobian" for a `.pt` file)."""
        return "tuned" if self.zoo else "jacobian" if self.is_file else None

    @property
    def short_name(self) -> str:
        """A name for the lens among others: its folder's or file's last part, else the repository's name."""
        if self.path is None:
            return "hub"
        return (self.path.rstrip("/").rsplit("/", 1)[-1] or self.repo_id.rsplit("/", 1)[-1]).removesuffix(
            JACOBIAN_SUFFIX
        )

    def for_model(self, model: str | None) -> HubLens:
        """This reference with the zoo entry of `model` (the loaded model's name or path) filled in for `hub`."""
        if self.path is not None:
            return self
        if not model or not is_hub_id(model):
            raise LensLabError(
                f"--lens {self.reference} looks up the tuned-lens zoo by the model's hub id, but the model was loaded "
                f"from {model or 'an unnamed source'!r}; pass --lens hub:MODEL_ID with the hub id it was made from, "
                f"e.g. hub:gpt2."
            )
        return HubLens(self.reference, self.repo_id, self.repo_type, f"{ZOO_FOLDER}/{model}", self.revision)

    def describe(self) -> str:
        """How errors name the lens: the reference, and for the zoo the entry it came to."""
        if self.zoo and self.path is not None:
            return f"{self.reference} (tuned-lens zoo entry {self.path.removeprefix(ZOO_FOLDER + '/')})"
        return self.reference


def is_reference(lens: str | Path) -> bool:
    """Whether `lens` is a hub reference rather than a local path: a `Path` never is (it would lose `//`), nor is a
    file or folder that exists (a folder named `hub`)."""
    if not isinstance(lens, str) or not (_ZOO.fullmatch(lens) or lens.startswith("hf://")):
        return False
    return not Path(lens).exists()


def parse(reference: str) -> HubLens:
    """What `reference` names; raises LensLabError for a misspelt one (before any model loads or download starts)."""
    zoo = _ZOO.fullmatch(reference)
    if zoo:
        name = zoo["name"]
        if name is not None and not HUB_ID.fullmatch(name):
            raise LensLabError(
                f"--lens {reference} does not name a model: after hub: comes a model's hub id, e.g. hub:gpt2 or "
                f"hub:EleutherAI/pythia-160m-deduped."
            )
        path = None if name is None else f"{ZOO_FOLDER}/{name}"
        return HubLens(reference, ZOO_REPO, "space", path, zoo["revision"])
    match = _REPOSITORY.fullmatch(reference)
    if match is None or not HUB_ID.fullmatch(match["repo"]) or ".." in (match["path"] or "").split("/"):
        raise LensLabError(f"--lens {reference} is not a hub lens reference; write {_FORMS}.")
    return HubLens(reference, match["repo"], "model", match["path"] or "", match["revision"])


def resolve(reference: str, model: str | None = None) -> Path:
    """The local copy of the lens `reference` names (downloaded into the hub's cache unless it is there): a lens
    folder, or a Jacobian-lens `.pt` file. `model` is the loaded model's name or path, which `hub` needs.

    Raises LensLabError, in one sentence with the fix, for a repository, revision or zoo entry the hub does not have,
    a lens neither cached nor reachable (offline), and a folder without a lens.
    """
    lens = parse(reference).for_model(model)
    assert lens.path is not None  # for_model filled it in
    try:
        local = _download(lens)
    except Exception as error:  # noqa: BLE001 - sorted out by _explain, which knows huggingface_hub's errors
        explained = _explain(lens, error)
        if explained is None:
            raise
        raise explained from None
    if not lens.is_file and not _holds_lens(local):
        raise _missing(lens, offline=hub_offline())
    return local


def _holds_lens(folder: Path) -> bool:
    """Whether `folder` has a lens's config and parameters (in either layout), not merely a model's config."""
    config, *params = LENS_FILES
    return (folder / config).is_file() and any((folder / name).is_file() for name in params)


def _download(lens: HubLens) -> Path:
    """The lens's files from the hub's cache, fetched first unless offline; the path of the folder or `.pt` file."""
    from huggingface_hub import hf_hub_download, snapshot_download

    assert lens.path is not None
    if lens.is_file:
        return Path(hf_hub_download(lens.repo_id, lens.path, repo_type=lens.repo_type, revision=lens.revision))
    prefix = f"{lens.path.strip('/')}/" if lens.path.strip("/") else ""
    snapshot = snapshot_download(
        lens.repo_id, repo_type=lens.repo_type, revision=lens.revision,
        allow_patterns=[prefix + name for name in LENS_FILES],
    )  # fmt: skip
    return Path(snapshot) / prefix


def _explain(lens: HubLens, error: Exception) -> LensLabError | None:
    """The one-sentence error for a failed download; None for an error that is no fault of the input."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = lens.describe()
    if isinstance(error, LocalEntryNotFoundError):  # before EntryNotFoundError, its parent
        return _missing(lens, offline=True)
    if isinstance(error, GatedRepoError):  # before RepositoryNotFoundError, its parent
        return LensLabError(
            f"--lens {where}: {lens.repo_id} is gated; accept its terms on its hub page and log in with "
            f"`hf auth login`."
        )
    if isinstance(error, RepositoryNotFoundError | HFValidationError):
        return LensLabError(
            f"--lens {where}: the hub has no {lens.repo_type} repository {lens.repo_id} you can see; check the name, "
            f"or log in with `hf auth login` for a private one."
        )
    if isinstance(error, RevisionNotFoundError):
        return LensLabError(
            f"--lens {where}: {lens.repo_id} has no revision {lens.revision!r}; pass a branch, tag or commit it has "
            f"after @."
        )
    if isinstance(error, EntryNotFoundError):
        return _missing(lens, offline=False)
    if _is_network_error(error):
        return LensLabError(
            f"--lens {where} could not be downloaded ({type(error).__name__}); connect to the network, or run with "
            f"HF_HUB_OFFLINE=1 once it is in the cache."
        )
    return None


def _missing(lens: HubLens, *, offline: bool) -> LensLabError:
    """The lens is not where the reference points: not in the cache (offline), or not in the repository."""
    where = lens.describe()
    what = "file" if lens.is_file else "lens folder"
    if offline:
        return LensLabError(
            f"--lens {where} is not in the Hugging Face cache and the hub cannot be reached (HF_HUB_OFFLINE is set "
            f"or there is no network); unset HF_HUB_OFFLINE and connect once to download it."
        )
    if lens.zoo:
        return LensLabError(
            f"--lens {where}: the tuned-lens zoo has no lens for this model; pick a model it has ({ZOO_URL}) with "
            f"--lens hub:MODEL_ID, or train one with lenslab train."
        )
    return LensLabError(
        f"--lens {where}: {lens.repo_id} holds no {what} at {lens.path or 'its root'!r} (a lens folder has "
        f"config.json and params.safetensors or params.pt); pass the folder or .pt file a lens was uploaded to."
    )
