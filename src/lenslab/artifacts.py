"""Lens files on disk: a directory with `config.json` and `params.safetensors`.

Also reads the layout of the `tuned-lens` package (`config.json` with `d_model`, `num_hidden_layers`,
`bias`, ...; `params.pt` with keys `"{i}.weight"`, `"{i}.bias"`) so published lenses work, but only through
`torch.load(weights_only=True)`: a pickle that would run code is refused.

Every file is written atomically (`lenslab.io`), so a crash never leaves a half-written file. A lens is two files,
so the config also records the SHA-256 of the parameters it goes with, and `write_lens` keeps the previous parameters
until the new config is in place (`write_lens` says how): a save killed at any point leaves the old lens or the new
one, never new parameters under an old config. The other files a training run keeps in the directory (its log, its
checkpoint) are not touched. Whether a lens read here fits a model is `lenslab.compatibility`'s question.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lenslab import __version__
from lenslab.errors import LensLabError
from lenslab.io import atomic_write_json, file_sha256, staged_file

log = logging.getLogger(__name__)

FORMAT_NAME = "lenslab-lens"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
TUNED_LENS_PARAMS_FILE = "params.pt"
PARAMS_BACKUP = ".params.safetensors.previous"
"""Where `write_lens` keeps the parameters the current config names until the new config replaces it."""


@dataclass
class LensConfig:
    """What a lens file records about itself and the model it was trained for."""

    kind: str
    """Lens kind, e.g. "tuned"."""
    d_model: int
    """Width of the residual stream the translators act on."""
    num_hidden_layers: int
    """Number of decoder layers of the base model (one translator each)."""
    bias: bool = True
    """Whether the translators have a bias."""
    base_model: str | None = None
    """Name or path of the model the lens was trained for."""
    base_model_revision: str | None = None
    """Hub revision of that model, when known."""
    vocab_size: int | None = None
    """Width of the model's logits."""
    unembed_fingerprint: dict[str, Any] | None = None
    """Shape and a strided sample of the unembedding weights (see `lenslab.compatibility.unembed_fingerprint`)."""
    params_sha256: str | None = None
    """SHA-256 of the `params.safetensors` written with this config (set by `write_lens`; None in older files)."""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    lenslab_version: str = __version__
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance, e.g. the training recipe and data."""

    def __post_init__(self) -> None:
        for name, (valid, expected) in _FIELD_CHECKS.items():
            value = getattr(self, name)
            if not valid(value):
                shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
                raise ValueError(f"{name} is {shown}, expected {expected}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: Path) -> LensConfig:
        """The config in `raw`, read from `source`; unknown keys are dropped with a warning, bad values refused."""
        fields = dataclasses.fields(cls)
        required = [f.name for f in fields if f.default is dataclasses.MISSING is f.default_factory]
        missing = [name for name in required if name not in raw]
        if missing:
            raise LensLabError(f"{source} lacks {', '.join(missing)}; re-save or re-download the lens.")
        known = {f.name for f in fields}
        for key in sorted(set(raw) - known):
            log.warning("Ignoring unknown key %r in lens config %s", key, source)
        try:
            return cls(**{key: value for key, value in raw.items() if key in known})
        except ValueError as error:
            raise LensLabError(
                f"{source} is not a valid lens config: {error}; re-save or re-download the lens."
            ) from None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_number_list(value: Any, kinds: type | tuple[type, ...]) -> bool:
    return isinstance(value, list) and all(isinstance(x, kinds) and not isinstance(x, bool) for x in value)


def _is_fingerprint(value: Any) -> bool:
    """A dict as `unembed_fingerprint` writes it (or lenslab 0.1, without "index")."""
    if not isinstance(value, dict):
        return False
    shape, sample = value.get("shape"), value.get("sample")
    if not (_is_number_list(shape, int) and len(shape) == 2 and _is_number_list(sample, (int, float)) and sample):
        return False
    return "index" not in value or (_is_number_list(value["index"], int) and len(value["index"]) == len(sample))


_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "kind": (lambda v: isinstance(v, str), "a string"),
    "d_model": (_is_count, "a positive integer"),
    "num_hidden_layers": (_is_count, "a positive integer"),
    "bias": (lambda v: isinstance(v, bool), "true or false"),
    "base_model": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "base_model_revision": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "vocab_size": (lambda v: v is None or _is_count(v), "a positive integer or null"),
    "unembed_fingerprint": (
        lambda v: v is None or _is_fingerprint(v),
        "null or an object of a [vocab, width] shape and a sample",
    ),
    "params_sha256": (
        lambda v: v is None or (isinstance(v, str) and bool(_SHA256.fullmatch(v))),
        "64 hex digits or null",
    ),
    "format": (lambda v: isinstance(v, str), "a string"),
    "format_version": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "lenslab_version": (lambda v: isinstance(v, str), "a string"),
    "metadata": (lambda v: isinstance(v, dict), "an object"),
}
"""Per `LensConfig` field: whether a value is acceptable, and what is expected (for the error)."""


def write_lens(directory: str | Path, config: LensConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `params.safetensors` and `config.json` into `directory` so that a kill at any point leaves the old
    lens or the new one.

    The new parameters are written in full first. Then the old ones, when they are the ones the config names,
    move to `PARAMS_BACKUP`; the new ones take their place; the new config, naming them by hash, replaces the old;
    the backup goes. Until the config is replaced, `read_lens` finds the old config's parameters by its hash in the
    backup. A `config.json` that is not a lenslab lens's is never overwritten.
    """
    directory = Path(directory)
    config_path, params, backup = directory / CONFIG_FILE, directory / PARAMS_FILE, directory / PARAMS_BACKUP
    old = _existing_lens_config(config_path)
    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    with staged_file(params, lambda tmp: save_file(contiguous, str(tmp), metadata={"format": "pt"})) as staged:
        digest = file_sha256(staged)
        if old is not None and _pairs_with(old, params, backup):
            os.replace(params, backup)
        os.replace(staged, params)
    atomic_write_json(config_path, dataclasses.asdict(dataclasses.replace(config, params_sha256=digest)))
    backup.unlink(missing_ok=True)
    return directory


def _existing_lens_config(config_path: Path) -> dict[str, Any] | None:
    """The lenslab lens config at `config_path`, None if there is none; raises if another kind of file is there."""
    if not config_path.exists():
        return None
    try:
        raw = json.loads(config_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raw = None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise LensLabError(
            f"{config_path} is not a lenslab lens config (a model's or a tuned-lens lens's, perhaps), and saving a "
            f"lens would overwrite it; save the lens to another directory."
        )
    return raw


def _pairs_with(config: dict[str, Any], params: Path, backup: Path) -> bool:
    """Whether `params` holds the parameters `config` names (else a save was killed and the backup holds them)."""
    if not params.is_file():
        return False
    if config.get("params_sha256") is None:  # written before configs named their params: see `_params_of`
        return not backup.is_file()
    return file_sha256(params) == config["params_sha256"]


def read_lens(directory: str | Path) -> tuple[LensConfig, dict[str, torch.Tensor]]:
    """Read a lens directory in lenslab's or the `tuned-lens` layout.

    Returns the config and the translator tensors named `translators.{i}.weight` / `translators.{i}.bias`.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise LensLabError(
            f"No lens found at {directory}: {CONFIG_FILE} is missing; pass the directory a lens was saved to."
        )
    try:
        raw = json.loads(config_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LensLabError(f"{config_path} is not valid JSON ({error}); re-save or re-download the lens.") from None
    if not isinstance(raw, dict):
        raise LensLabError(f"{config_path} does not hold a JSON object; re-save or re-download the lens.")
    if raw.get("format") == FORMAT_NAME or (directory / PARAMS_FILE).is_file():
        return _read_lenslab(directory, raw)
    if (directory / TUNED_LENS_PARAMS_FILE).is_file():
        return _read_tuned_lens(directory, raw)
    raise LensLabError(
        f"No lens parameters found in {directory}: expected {PARAMS_FILE} (lenslab) or "
        f"{TUNED_LENS_PARAMS_FILE} (tuned-lens); pass the directory a lens was saved to."
    )


def _read_lenslab(directory: Path, raw: dict[str, Any]) -> tuple[LensConfig, dict[str, torch.Tensor]]:
    config_path = directory / CONFIG_FILE
    if raw.get("format") != FORMAT_NAME:
        raise LensLabError(f"{config_path} is not a lenslab lens config (no format={FORMAT_NAME!r}).")
    config = LensConfig.from_dict(raw, config_path)
    if config.format_version > FORMAT_VERSION:
        raise LensLabError(
            f"The lens in {directory} uses format version {config.format_version}, newer than this lenslab "
            f"understands ({FORMAT_VERSION}); upgrade lenslab."
        )
    params = _params_of(directory, config)
    try:
        tensors = load_file(str(params))
    except (SafetensorError, OSError) as error:
        raise LensLabError(f"{params} is truncated or corrupted ({error}); re-train or re-download the lens.") from None
    return config, tensors


def _params_of(directory: Path, config: LensConfig) -> Path:
    """The parameters file written with `config`: `PARAMS_FILE`, or `PARAMS_BACKUP` after a killed `write_lens`."""
    params, backup = directory / PARAMS_FILE, directory / PARAMS_BACKUP
    if not (params.is_file() or backup.is_file()):
        raise LensLabError(
            f"No lens parameters found in {directory}: {PARAMS_FILE} is missing; re-save, re-train or re-download "
            f"the lens."
        )
    if config.params_sha256 is None:
        # Written before configs named their params; a backup beside it can only be from a save killed before the
        # new config (which always has the hash) replaced it, so the backup holds this config's parameters.
        found = backup if backup.is_file() else params
    else:
        found = next((p for p in (params, backup) if p.is_file() and file_sha256(p) == config.params_sha256), None)
    if found is None:
        raise LensLabError(
            f"{params} is truncated, corrupted or not the file written with {directory / CONFIG_FILE} (its SHA-256 "
            f"differs from the one the config records); re-save, re-train or re-download the whole lens."
        )
    if found == backup:
        log.warning("The last save to %s was interrupted; loading the lens as it was before that save.", directory)
    return found


def _read_tuned_lens(directory: Path, raw: dict[str, Any]) -> tuple[LensConfig, dict[str, torch.Tensor]]:
    config_path = directory / CONFIG_FILE
    missing = [key for key in ("d_model", "num_hidden_layers") if key not in raw]
    if missing:
        raise LensLabError(f"{config_path} lacks {', '.join(missing)}; it is not a tuned-lens config.")
    lens_type = raw.get("lens_type", "linear_tuned_lens")
    if lens_type != "linear_tuned_lens":
        raise LensLabError(f"Unsupported tuned-lens lens_type {lens_type!r}; only 'linear_tuned_lens' can be read.")
    try:
        config = LensConfig(
            kind="tuned", d_model=raw["d_model"], num_hidden_layers=raw["num_hidden_layers"],
            bias=raw.get("bias", True), base_model=raw.get("base_model_name_or_path"),
            base_model_revision=raw.get("base_model_revision"),
            metadata={"converted_from": "tuned-lens", "unembed_hash": raw.get("unembed_hash")},
        )  # fmt: skip
    except ValueError as error:
        raise LensLabError(f"{config_path} is not a valid tuned-lens config: {error}; re-download the lens.") from None
    path = directory / TUNED_LENS_PARAMS_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise LensLabError(
            f"Refused to load {path}: it contains Python objects that would run code when unpickled, "
            f"and a lens file should hold only tensors; obtain the lens from a trusted source."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise LensLabError(f"{path} is truncated or corrupted ({error}); re-download the lens.") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LensLabError(f"{path} does not hold a dictionary of tensors; it is not a tuned-lens params file.")
    return config, {f"translators.{key}": tensor for key, tensor in state.items()}
