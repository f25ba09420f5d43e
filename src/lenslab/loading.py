"""Load a Hugging Face causal LM and its tokenizer for lensing."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import is_accelerate_available

from lenslab.errors import LensLabError
from lenslab.gguf import dequantised_folder, is_gguf
from lenslab.model_source import check_model_source

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoadedModel(NamedTuple):
    model: PreTrainedModel
    """The causal LM, in eval mode with gradients disabled."""
    tokenizer: PreTrainedTokenizerBase


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """ "auto" (or None) means CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise LensLabError(f"Unknown device {device!r}; pass --device cpu, cuda, cuda:N or auto.") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise LensLabError(
                f"--device {device} needs CUDA, but this torch build has no CUDA support or finds no GPU; pass "
                f"--device cpu or auto, or install a CUDA build of torch."
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise LensLabError(
                f"--device {device} names GPU {resolved.index}, but only {torch.cuda.device_count()} are visible; "
                f"pass an index below {torch.cuda.device_count()}."
            )
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """ "auto" keeps float32 on CPU (where bf16 matmuls are slow) and uses bf16 on CUDA when supported."""
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
    device_map: str | dict[str, int | str] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer with `from_pretrained` (a hub id, a local directory or a `.gguf` file).

    A GGUF file (llama.cpp, Ollama, LM Studio) is dequantised once and read from lenslab's cache afterwards (see
    `lenslab.gguf`). The model is returned in eval mode with `requires_grad` off: lenses never train the model.

    A model too big for one device can be spread over several with a `device_map` ("auto", "balanced",
    "sequential", or {module path: device, "cpu" or "disk"}), which needs accelerate: `max_memory` ({0: "20GiB",
    "cpu": "60GiB"}) caps what "auto" puts on each device and `offload_folder` holds what it puts on disk when the
    checkpoint is not in safetensors. The device map then places every part, and `device` only chooses the default
    dtype.

    >>> model, tokenizer = load_model("gpt2")  # doctest: +SKIP
    """
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise LensLabError(
            "max_memory and offload_folder only apply to a model spread by a device map; pass device_map='auto' "
            "(--device-map auto) with them."
        )
    if device_map is not None and not is_accelerate_available():
        raise LensLabError(
            f"Loading with device_map={device_map!r} needs the accelerate package, which is not installed; "
            "pip install accelerate (or the lenslab[big] extra)."
        )
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source = name_or_path
    if is_gguf(name_or_path):
        source = str(dequantised_folder(Path(name_or_path), torch_dtype, trust_remote_code=trust_remote_code))
    else:
        check_model_source(name_or_path, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source,
            revision=revision,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=offload_folder,
        )
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LensLabError(
            f"Could not load model {name_or_path!r} ({first_line}); pass --model a Hugging Face hub id or a "
            f"local directory saved with save_pretrained."
        ) from None
    if source != name_or_path:
        model.config.name_or_path = name_or_path  # lens files and titles name the GGUF file, not the cache copy
    if device_map is None:  # else the device map has placed every part
        model.to(device)
    model.eval().requires_grad_(False)
    placement = device if device_map is None else getattr(model, "hf_device_map", device_map)
    log.info("Loaded %s (%s, %s) on %s", name_or_path, type(model).__name__, torch_dtype, placement)
    return LoadedModel(model, tokenizer)
