"""Publishing a lens on the Hugging Face Hub as a model repository: `config.json`, `params.safetensors` and a model
card (`README.md`, `lenslab.model_card`), which `--lens hf://OWNER/NAME` then loads (`lenslab.hub`).

The lens folder is read as loading reads it (either layout; the parameters' SHA-256 checked), and written afresh in
lenslab's layout into a temporary folder: a tuned-lens `params.pt` becomes safetensors, and nothing else the folder
holds (a training log, checkpoints) goes along. That folder is what is uploaded, in one commit, or with a dry run
copied into `--output`, so a dry run shows exactly what an upload would send. Every input is checked before
anything is read or sent.

>>> push_lens("runs/gpt2-lens", "me/gpt2-tuned-lens", evaluation="eval.json")     # doctest: +SKIP
Publication(repo_id='me/gpt2-tuned-lens', files=['README.md', 'config.json', 'params.safetensors'], ...)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lenslab.artifacts import CONFIG_FILE, FORMAT_NAME, PARAMS_FILE, read_lens, write_lens
from lenslab.errors import LensLabError
from lenslab.io import atomic_write
from lenslab.model_card import model_card
from lenslab.model_source import HUB_ID, _is_network_error, hub_offline, is_hub_id

CARD_FILE = "README.md"
PUBLISHED_FILES = (CARD_FILE, CONFIG_FILE, PARAMS_FILE)
"""What a published lens repository holds, and all that a dry run writes."""


@dataclass
class Publication:
    """What `push_lens` sent, or with a dry run wrote."""

    repo_id: str
    """The repository, OWNER/NAME."""
    files: list[str]
    """The files, by name."""
    url: str | None
    """The commit's address on the hub; None for a dry run."""
    written: list[Path]
    """The files a dry run wrote; empty after an upload."""


def push_lens(
    directory: str | Path, repo_id: str, *, evaluation: dict[str, Any] | str | Path | None = None,
    base_model: str | None = None, private: bool = False, dry_run: str | Path | None = None, token: str | None = None,
) -> Publication:  # fmt: skip
    """Upload the lens in `directory` to the hub model repository `repo_id` (created, `private` if asked, when
    missing), with a model card; with `dry_run` a folder, write the files there instead and upload nothing.

    evaluation: the JSON `lenslab eval --output` wrote with this lens (or its path), for the card's table.
    base_model: the hub id the card names; default: the model the lens records, which must then be a hub id.
    token: a hub token; default: the one `hf auth login` stored.
    """
    directory = Path(directory)
    if not HUB_ID.fullmatch(repo_id) or "/" not in repo_id:
        raise LensLabError(f"--repo {repo_id} is not a hub repository name; pass OWNER/NAME, e.g. me/gpt2-tuned-lens.")
    if not directory.is_dir():
        what = "a file" if directory.is_file() else "not there"
        raise LensLabError(f"--lens {directory} is {what}; pass the folder holding the lens's config.json.")
    if isinstance(evaluation, str | Path):
        evaluation = _read_evaluation(Path(evaluation))
    if dry_run is not None:
        _check_dry_run_folder(Path(dry_run))
    elif hub_offline():
        raise LensLabError(
            "lenslab push uploads to the hub, but HF_HUB_OFFLINE is set; unset it, or pass --dry-run --output DIR to "
            "only write the files."
        )
    config, tensors = read_lens(directory)
    base_model = base_model or config.base_model
    if not base_model or not is_hub_id(base_model):
        raise LensLabError(
            f"The lens in {directory} records its model as {config.base_model!r}, not a hub id, and its card must "
            f"name one; pass --base-model OWNER/NAME (base_model=) with the model's hub id."
        )
    config = dataclasses.replace(config, base_model=base_model)
    with tempfile.TemporaryDirectory(prefix="lenslab-push-") as staging:
        write_lens(staging, config, tensors)
        card = model_card(config, base_model=base_model, repo_id=repo_id, evaluation=evaluation)
        (Path(staging) / CARD_FILE).write_text(card, encoding="utf-8")
        if dry_run is not None:
            written = [_copy(Path(staging) / name, Path(dry_run) / name) for name in PUBLISHED_FILES]
            return Publication(repo_id, list(PUBLISHED_FILES), None, written)
        message = f"{config.kind} lens for {base_model}, by lenslab"
        url = _upload(Path(staging), repo_id, private=private, token=token, message=message)
    return Publication(repo_id, list(PUBLISHED_FILES), url, [])


def _read_evaluation(path: Path) -> dict[str, Any]:
    try:
        evaluation = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise LensLabError(
            f"--eval {path} could not be read as JSON ({error}); pass the file lenslab eval --output wrote."
        ) from None
    if not isinstance(evaluation, dict):
        raise LensLabError(f"--eval {path} holds no JSON object; pass the file lenslab eval --output wrote.")
    return evaluation


def _check_dry_run_folder(folder: Path) -> None:
    """Refuse a dry run's `--output` that is a file, or a folder holding anything but an earlier dry run's files:
    what lenslab did not write is never replaced."""
    if folder.exists() and not folder.is_dir():
        raise LensLabError(f"--output {folder} is a file; pass a folder for the files to upload.")
    if not folder.is_dir():
        return
    foreign = sorted(path.name for path in folder.iterdir() if not _from_dry_run(path))
    if foreign:
        raise LensLabError(
            f"--output {folder} already holds {', '.join(foreign)}, which a lenslab push dry run did not write; pass "
            f"a new or empty folder."
        )


def _from_dry_run(path: Path) -> bool:
    """Whether `path`, in a dry run's folder, is a file an earlier dry run wrote (recognised by its content)."""
    if path.name == PARAMS_FILE:
        return path.is_file() and _from_dry_run(path.with_name(CONFIG_FILE))
    mark = {CARD_FILE: "library_name: lenslab", CONFIG_FILE: f'"format": "{FORMAT_NAME}"'}.get(path.name)
    return mark is not None and path.is_file() and mark in path.read_text(encoding="utf-8", errors="replace")


def _copy(source: Path, target: Path) -> Path:
    atomic_write(target, lambda temporary: shutil.copyfile(source, temporary))
    return target


def _upload(folder: Path, repo_id: str, *, private: bool, token: str | None, message: str) -> str:
    """Create the repository if missing and commit the folder's files to it; the commit's address."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=message)
    except LocalTokenNotFoundError:
        raise LensLabError(f"Uploading to {repo_id} needs a hub token; log in with `hf auth login`.") from None
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        if status in (401, 403):
            raise LensLabError(
                f"The hub refused to let this account write to {repo_id} (HTTP {status}); log in with `hf auth login` "
                f"as its owner, or pass a --repo under your own name."
            ) from None
        raise LensLabError(f"The hub refused the upload to {repo_id} ({error}); try again later.") from None
    except Exception as error:
        if not _is_network_error(error):
            raise
        raise LensLabError(
            f"Cannot reach the Hugging Face hub to upload to {repo_id} ({type(error).__name__}); connect to the "
            f"network, or pass --dry-run --output DIR to only write the files."
        ) from None
    return str(getattr(commit, "commit_url", commit))
