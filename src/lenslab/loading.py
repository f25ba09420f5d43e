"""Load a Hugging Face causal LM and its tokenizer for lensing."""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lenslab.errors import LensLabError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoadedModel(NamedTuple):
    model: PreTrainedModel
    """The causal LM, in eval mode with gradients disabled."""
    tokenizer: PreTrainedTokenizerBase


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None) means CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise LensLabError(f"Unknown device {device!r}; pass --device cpu, cuda, cuda:N or auto.") from None


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto" keeps float32 on CPU (where bf16 matmuls are slow) and uses bf16 on CUDA when supported."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise LensLabError(f"Unknown dtype {dtype!r}; pass --dtype auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer with `from_pretrained` (a hub id or a local directory).

    The model is returned in eval mode with `requires_grad` off: lenses never train the model.

    >>> model, tokenizer = load_model("gpt2")  # doctest: +SKIP
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, revision=revision, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LensLabError(
            f"Could not load model {name_or_path!r} ({first_line}); pass --model a Hugging Face hub id or a "
            f"local directory saved with save_pretrained."
        ) from None
    model.to(device).eval().requires_grad_(False)
    log.info("Loaded %s (%s, %s) on %s", name_or_path, type(model).__name__, torch_dtype, device)
    return LoadedModel(model, tokenizer)
