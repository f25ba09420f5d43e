"""GGUF model files (llama.cpp, Ollama, LM Studio): read once through transformers, then kept as a plain folder.

transformers reads a GGUF file with `from_pretrained(folder, gguf_file=name)` (it needs the `gguf` package) and
dequantises every tensor to float, so the quantisation's rounding stays in the weights but the model runs as an
ordinary `PreTrainedModel`. That conversion is slow (about 25-70 s for a 135M-parameter file on two CPU cores), so
the result is saved with `save_pretrained` into a cache folder (`cache_root() / "gguf"`), keyed by the file's
path, size, modification time and the dtype asked for; the next load of the same file is a plain folder load.

>>> folder = dequantised_folder(Path("SmolLM2-135M-Instruct.Q4_1.gguf"), torch.float32)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lenslab.errors import LensLabError

log = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
CACHE_ENV = "LENSLAB_CACHE"
"""Environment variable naming lenslab's cache folder (default: `$XDG_CACHE_HOME/lenslab` or `~/.cache/lenslab`)."""


def cache_root() -> Path:
    """The folder where lenslab keeps what it converts or fetches once: `$LENSLAB_CACHE`, else the XDG cache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "lenslab"


def is_gguf(name_or_path: str | os.PathLike) -> bool:
    """Whether `--model` names a GGUF file (by its suffix; the file itself is checked when it is read)."""
    return str(name_or_path).lower().endswith(GGUF_SUFFIX)


def dequantised_folder(path: Path, dtype: torch.dtype, *, trust_remote_code: bool = False) -> Path:
    """A `save_pretrained` folder holding the model and tokenizer of the GGUF file `path`, weights in `dtype`.

    Converted on the first call for this file and dtype, then found in the cache; the folder appears whole (it is
    written under a temporary name and renamed), so an interrupted conversion leaves nothing half-written.
    """
    path = path.expanduser().resolve()
    if not path.is_file():
        raise LensLabError(f"GGUF file {path} does not exist; pass --model the path of a .gguf file.")
    if importlib.util.find_spec("gguf") is None:
        raise LensLabError(f"Reading {path.name} needs the gguf package; install it with pip install 'lenslab[gguf]'.")
    folder = cache_root() / "gguf" / f"{path.stem}-{_file_key(path, dtype)}"
    if (folder / "config.json").is_file():
        log.info("Reading the dequantised copy of %s from %s", path.name, folder)
        return folder
    log.info("Dequantising %s (once; later loads read the copy in %s)", path.name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        _convert(path, dtype, staging, trust_remote_code)
        try:
            staging.rename(folder)
        except OSError:  # another process finished the same conversion first: its copy is as good as ours
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _file_key(path: Path, dtype: torch.dtype) -> str:
    """What identifies a conversion: the file (path, size, modification time) and the weights' dtype."""
    stat = path.stat()
    identity = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}"
    return hashlib.blake2b(identity.encode(), digest_size=8).hexdigest()


def _convert(path: Path, dtype: torch.dtype, destination: Path, trust_remote_code: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = {"gguf_file": path.name, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **options)
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **options)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise LensLabError(
            f"Could not read the GGUF file {path} ({first_line}); pass a GGUF file of an architecture transformers "
            f"reads (see its GGUF documentation) or the model's Hugging Face folder."
        ) from None
    # The weights are now plain floats; transformers refuses to save a model that still says it is
    # "quantized with gguf", and the copy must load without the GGUF reader.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
