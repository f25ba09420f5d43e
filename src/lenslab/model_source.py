"""What a `--model` names, and why it cannot be loaded, said before `from_pretrained` says it less clearly.

`transformers` reads a mistyped local path as a hub id ("Repo id must be in the form 'repo_name'..."), a folder
that is not a model as a tokenizer problem ("Couldn't instantiate the backend tokenizer..."), and, without a
network, retries a hub id for about a minute. `check_model_source` answers each in one sentence, at once;
`lenslab.loading.load_model` calls it first. Imports of the hub client happen only for hub ids.
"""

from __future__ import annotations

import re
from pathlib import Path

from lenslab.errors import LensLabError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
"""A hub id: a repository name, optionally after an owner and a slash (`gpt2`, `EleutherAI/pythia-160m`)."""
HUB_TIMEOUT = 10.0
"""Seconds to wait for the hub before calling it unreachable."""


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a hub id and no local file or folder has that name."""
    return bool(HUB_ID.fullmatch(name)) and not Path(name).expanduser().exists()


def check_model_source(name_or_path: str, revision: str | None = None) -> None:
    """Raise LensLabError, quickly, if `name_or_path` is a local path that holds no model, a path that does not
    exist, or a hub id the hub does not have or cannot be reached for (with the HF_HUB_OFFLINE=1 hint when a copy is
    cached). A GGUF file is dequantised before this is asked (see `lenslab.gguf`)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LensLabError(
                f"--model {name_or_path} is a folder without a config.json, so not a saved model; pass the folder "
                f"save_pretrained wrote (config.json, the weights and the tokenizer files)."
            )
        return
    if path.exists():
        raise LensLabError(
            f"--model {name_or_path} is a file, not a model; pass a folder saved with save_pretrained, a .gguf file "
            f"or a hub id."
        )
    if not HUB_ID.fullmatch(name_or_path):
        raise LensLabError(
            f"--model {name_or_path} does not exist; check the folder's path, or pass a hub id such as gpt2."
        )
    _check_hub(name_or_path, revision)


def _check_hub(repo_id: str, revision: str | None) -> None:
    """Ask the hub for `repo_id` once, with a short timeout, instead of letting `from_pretrained` retry."""
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    cached = isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    if hub_offline():
        if not cached:
            raise LensLabError(
                f"--model {repo_id} is not in the local cache and HF_HUB_OFFLINE is set; unset it to download the "
                f"model, or pass a local folder."
            )
        return
    try:
        model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT)
    except GatedRepoError:  # before its parent class, RepositoryNotFoundError
        raise LensLabError(
            f"--model {repo_id} is gated; accept its terms on its hub page and log in with `hf auth login`."
        ) from None
    except RepositoryNotFoundError:
        raise LensLabError(
            f"--model {repo_id} is neither a local folder nor a model on the hub you can see; check the name, or log "
            f"in with `hf auth login` for a private model."
        ) from None
    except RevisionNotFoundError:
        raise LensLabError(
            f"--revision {revision} does not exist for model {repo_id}; pass a branch, tag or commit it has."
        ) from None
    except HfHubHTTPError:
        return  # the hub answered with another error; from_pretrained will meet it and say what it is
    except Exception as error:  # noqa: BLE001 - the HTTP client's errors differ between hub versions
        if not _is_network_error(error):
            raise
        hint = (
            "a copy is in the local cache, so run with HF_HUB_OFFLINE=1 to use it"
            if cached
            else ("connect to the network, or pass a local folder")
        )
        raise LensLabError(
            f"Cannot reach the Hugging Face hub for model {repo_id} ({type(error).__name__}); {hint}."
        ) from None


def _is_network_error(error: Exception) -> bool:
    """A connection, DNS, TLS or timeout failure, from the socket layer or from the hub's HTTP client."""
    package = type(error).__module__.split(".")[0]
    return isinstance(error, OSError) or package.startswith(("httpx", "requests", "urllib3"))


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE forbids huggingface_hub to reach the hub."""
    from huggingface_hub import constants

    # huggingface_hub >= 1.2 reads the variable when asked; older versions only at import.
    is_offline_mode = getattr(constants, "is_offline_mode", None)
    return is_offline_mode() if is_offline_mode is not None else constants.HF_HUB_OFFLINE
