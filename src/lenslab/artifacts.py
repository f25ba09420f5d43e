"""Lens files on disk: a directory with `config.json` and `params.safetensors`.

Also reads the layout of the `tuned-lens` package (`config.json` with `d_model`, `num_hidden_layers`,
`bias`, ...; `params.pt` with keys `"{i}.weight"`, `"{i}.bias"`) so published lenses work, but only through
`torch.load(weights_only=True)`: a pickle that would run code is refused.

Every file is written to a temporary name in the same directory and renamed into place, so a crash never
leaves a half-written lens, and the parameters are renamed before the config that points at them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lenslab import __version__
from lenslab.adapter import ModelView
from lenslab.errors import LensLabError, LensModelMismatch

log = logging.getLogger(__name__)

FORMAT_NAME = "lenslab-lens"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
TUNED_LENS_PARAMS_FILE = "params.pt"
# Entries of the unembedding sampled for the fingerprint; enough to tell models apart, small enough to read.
FINGERPRINT_SAMPLES = 64
# bf16 rounds to ~0.4% per entry, so a lens trained on the same model in another dtype stays well inside this.
FINGERPRINT_RTOL = 2e-2


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
    """Shape and a strided sample of the unembedding weights (see `unembed_fingerprint`)."""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    lenslab_version: str = __version__
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance, e.g. the training recipe and data."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LensConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in sorted(set(raw) - known):
            log.warning("Ignoring unknown key %r in lens config", key)
        return cls(**{key: value for key, value in raw.items() if key in known})


def fingerprint_indices(numel: int) -> torch.Tensor:
    """`FINGERPRINT_SAMPLES` evenly strided flat indices into a tensor of `numel` entries: [samples] int64.

    Integer arithmetic: float32 index math rounds past the last entry once `numel` exceeds 2^24 (GPT-2's
    unembedding has 38.6M entries).
    """
    return torch.arange(FINGERPRINT_SAMPLES, dtype=torch.int64) * (numel - 1) // (FINGERPRINT_SAMPLES - 1)


def _legacy_fingerprint_indices(numel: int) -> torch.Tensor:
    """The indices lenslab 0.1 fingerprints sampled (float32 `linspace`), to check lens files it wrote; it could
    only write them for unembeddings of at most 2^24 entries, where these stay in range."""
    return torch.linspace(0, numel - 1, FINGERPRINT_SAMPLES).long().clamp_(max=numel - 1)


def unembed_fingerprint(weight: torch.Tensor) -> dict[str, Any]:
    """Shape plus `FINGERPRINT_SAMPLES` evenly strided entries of the unembedding, as float32, and where they sit.

    A sample rather than a hash, so that the same model loaded in bf16 or float32 still matches while a
    different (or fine-tuned) model does not. weight: [vocab, d_unembed].
    """
    index = fingerprint_indices(weight.numel())
    return {"shape": list(weight.shape), "index": index.tolist(), "sample": _sample(weight, index)}


def _sample(weight: torch.Tensor, index: torch.Tensor) -> list[float]:
    return weight.detach().reshape(-1)[index.to(weight.device)].float().cpu().tolist()


def fingerprint_matches(stored: dict[str, Any], weight: torch.Tensor) -> bool:
    """Whether the unembedding `weight` ([vocab, d_unembed]) has the shape and, at the stored indices, nearly the
    values of the fingerprint `stored` (one written by `unembed_fingerprint`, or by lenslab 0.1 without indices)."""
    if list(stored.get("shape", [])) != list(weight.shape):
        return False
    numel = weight.numel()
    index = torch.tensor(stored["index"]) if "index" in stored else _legacy_fingerprint_indices(numel)
    if index.numel() == 0 or index.min() < 0 or index.max() >= numel:
        return False
    stored_sample = torch.tensor(stored.get("sample", []), dtype=torch.float32)
    current_sample = torch.tensor(_sample(weight, index), dtype=torch.float32)
    if stored_sample.shape != current_sample.shape:
        return False
    error = (stored_sample - current_sample).norm()
    return bool(error <= FINGERPRINT_RTOL * current_sample.norm().clamp_min(1e-12))


def check_compatible(config: LensConfig, view: ModelView, directory: Path, check: str) -> None:
    """Refuse a lens whose shapes (and, with check="full", unembedding) differ from the model's."""
    if check not in ("full", "shapes"):
        raise LensLabError(f"Unknown lens check {check!r}; pass check='full' or check='shapes'.")
    model_name = view.model.config.name_or_path or type(view.model).__name__
    if config.d_model != view.d_model:
        raise LensLabError(
            f"Hidden size mismatch: the lens in {directory} has d_model={config.d_model} but model "
            f"{model_name!r} has a residual width of {view.d_model}; load a lens trained for this model."
        )
    if config.num_hidden_layers != view.num_layers:
        raise LensLabError(
            f"The lens in {directory} has {config.num_hidden_layers} layers but model {model_name!r} has "
            f"{view.num_layers}; load a lens trained for this model."
        )
    if check == "shapes" or config.unembed_fingerprint is None:
        return
    if not fingerprint_matches(config.unembed_fingerprint, view.unembedding_weight()):
        raise LensModelMismatch(
            f"The lens in {directory} was trained for model {config.base_model!r}, whose unembedding differs "
            f"from that of model {model_name!r}; load a lens trained for this model, or pass check='shapes' "
            f"(CLI: --allow-model-mismatch) to apply it to a fine-tuned relative anyway."
        )


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(temporary_path)`, then rename the result onto `path` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        # mkstemp creates owner-only files; give the result the permissions a plain open() would.
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def write_lens(directory: str | Path, config: LensConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `params.safetensors` then `config.json` into `directory`, each atomically."""
    directory = Path(directory)
    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    atomic_write(directory / PARAMS_FILE, lambda tmp: save_file(contiguous, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(directory / CONFIG_FILE, dataclasses.asdict(config))
    return directory


def read_lens(directory: str | Path) -> tuple[LensConfig, dict[str, torch.Tensor]]:
    """Read a lens directory in lenslab's or the `tuned-lens` layout.

    Returns the config and the translator tensors named `translators.{i}.weight` / `translators.{i}.bias`.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise LensLabError(f"No lens found at {directory}: {CONFIG_FILE} is missing; pass the directory a lens was saved to.")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LensLabError(f"{config_path} is not valid JSON ({error}); re-save or re-download the lens.") from None
    if not isinstance(raw, dict):
        raise LensLabError(f"{config_path} does not hold a JSON object; re-save or re-download the lens.")
    if (directory / PARAMS_FILE).is_file():
        return _read_lenslab(directory, raw)
    if (directory / TUNED_LENS_PARAMS_FILE).is_file():
        return _read_tuned_lens(directory, raw)
    raise LensLabError(
        f"No lens parameters found in {directory}: expected {PARAMS_FILE} (lenslab) or "
        f"{TUNED_LENS_PARAMS_FILE} (tuned-lens); pass the directory a lens was saved to."
    )


def _read_lenslab(directory: Path, raw: dict[str, Any]) -> tuple[LensConfig, dict[str, torch.Tensor]]:
    if raw.get("format") != FORMAT_NAME:
        raise LensLabError(f"{directory / CONFIG_FILE} is not a lenslab lens config (no format={FORMAT_NAME!r}).")
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise LensLabError(
            f"The lens in {directory} uses format version {raw['format_version']}, newer than this lenslab "
            f"understands ({FORMAT_VERSION}); upgrade lenslab."
        )
    try:
        config = LensConfig.from_dict(raw)
    except TypeError as error:
        raise LensLabError(f"{directory / CONFIG_FILE} lacks required fields ({error}); re-save the lens.") from None
    try:
        tensors = load_file(str(directory / PARAMS_FILE))
    except (SafetensorError, OSError) as error:
        raise LensLabError(
            f"{directory / PARAMS_FILE} is truncated or corrupted ({error}); re-train or re-download the lens."
        ) from None
    return config, tensors


def _read_tuned_lens(directory: Path, raw: dict[str, Any]) -> tuple[LensConfig, dict[str, torch.Tensor]]:
    missing = [key for key in ("d_model", "num_hidden_layers") if key not in raw]
    if missing:
        raise LensLabError(f"{directory / CONFIG_FILE} lacks {', '.join(missing)}; it is not a tuned-lens config.")
    lens_type = raw.get("lens_type", "linear_tuned_lens")
    if lens_type != "linear_tuned_lens":
        raise LensLabError(f"Unsupported tuned-lens lens_type {lens_type!r}; only 'linear_tuned_lens' can be read.")
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
    config = LensConfig(
        kind="tuned",
        d_model=int(raw["d_model"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        bias=bool(raw.get("bias", True)),
        base_model=raw.get("base_model_name_or_path"),
        base_model_revision=raw.get("base_model_revision"),
        metadata={"converted_from": "tuned-lens"},
    )
    return config, {f"translators.{key}": tensor for key, tensor in state.items()}
