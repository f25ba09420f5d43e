"""Whether a lens fits a model: the unembedding fingerprint a lens file records, the tuned-lens package's
unembedding hash, and the model names, checked by `check_compatible` when a lens is loaded.

A fingerprint is a sample of the unembedding rather than a hash, so that the same model loaded in bfloat16 or
float32 still matches while a different (or fine-tuned) model does not.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lenslab.adapter import ModelView
from lenslab.artifacts import LensConfig
from lenslab.errors import LensLabError, LensModelMismatch
from lenslab.model_source import is_hub_id

log = logging.getLogger(__name__)

# Entries of the unembedding sampled for the fingerprint; enough to tell models apart, small enough to read.
FINGERPRINT_SAMPLES = 64
# bf16 rounds to ~0.4% per entry, so a lens trained on the same model in another dtype stays well inside this.
FINGERPRINT_RTOL = 2e-2


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


def model_facts(view: ModelView) -> dict[str, Any]:
    """What a lens file records about its model, as `LensConfig` fields: its name and revision, the width of its
    logits and the fingerprint of its unembedding that `check_compatible` compares."""
    config = view.model.config
    return {
        "base_model": config.name_or_path or None,
        "base_model_revision": getattr(config, "_commit_hash", None),
        "vocab_size": view.vocab_size,
        "unembed_fingerprint": unembed_fingerprint(view.unembedding_weight()),
    }


def check_compatible(config: LensConfig, view: ModelView, directory: Path, check: str) -> None:
    """Refuse a lens whose shapes (and, with check="full", model) differ from the model's.

    With check="full" the unembedding fingerprint decides; a lens without one (a tuned-lens file, an old lenslab
    file) is confirmed by the tuned-lens unembedding hash when it has one, else by the model names: refused when
    both are hub ids of different models, let through with a warning when the names cannot tell.
    """
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
    if check == "shapes":
        return
    if config.unembed_fingerprint is not None:
        if not fingerprint_matches(config.unembed_fingerprint, view.unembedding_weight()):
            raise LensModelMismatch(
                f"The lens in {directory} was trained for model {config.base_model!r}, whose unembedding differs "
                f"from that of model {model_name!r}; load a lens trained for this model, or pass check='shapes' "
                f"(CLI: --allow-model-mismatch) to apply it to a fine-tuned relative anyway."
            )
        return
    stored_hash = config.metadata.get("unembed_hash")
    if stored_hash is not None and stored_hash == tuned_lens_unembed_hash(view.unembedding_weight()):
        return
    base, name = config.base_model or "", view.model.config.name_or_path or ""
    if base and name and _model_key(base) == _model_key(name):
        return
    if is_hub_id(base) and is_hub_id(name):
        raise LensModelMismatch(
            f"The lens in {directory} was trained for model {base!r}, not {name!r}, and holds no unembedding "
            f"fingerprint that could show them to be the same; load a lens trained for this model, or pass "
            f"check='shapes' (CLI: --allow-model-mismatch) to apply it anyway."
        )
    log.warning(
        "The lens in %s cannot be checked against model %r: it was trained for %s and holds no unembedding "
        "fingerprint; make sure it was trained for this model.",
        directory, model_name, repr(base) if base else "an unrecorded model",
    )  # fmt: skip


def tuned_lens_unembed_hash(weight: torch.Tensor) -> str:
    """The `unembed_hash` the tuned-lens package records: SHA-256 of numpy's one-decimal summary of the unembedding
    ([vocab, d_unembed]), which prints only its corners; the same model in another dtype nearly always matches."""
    return hashlib.sha256(np.array_str(weight.detach().float().cpu().numpy(), precision=1).encode()).hexdigest()


def _model_key(name: str) -> str:
    """What spellings of one model share: `EleutherAI/pythia-160m`, `/models/Pythia-160M/` -> `pythia-160m`."""
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
