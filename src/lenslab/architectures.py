"""Where each family of causal LMs keeps the parts a lens needs, as a table, and how parts outside it are found.

Each canonical part maps to the attribute paths that families use for it (`PATHS`), each logit transform to the
config attributes that declare it (`LOGIT_MULTIPLIERS`, Gemma's ``final_logit_softcapping``), and the context
length to the attributes that hold it (`CONTEXT_ATTRIBUTES`). A model outside the table is read by structure: the
one ``nn.ModuleList`` as long as ``config.num_hidden_layers``; for the final norm, the norm-like modules outside
the layers, among which `lenslab.adapter.ModelView` chooses by behaviour. Any part can be named explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lenslab.errors import LensLabError

# Canonical part -> attribute paths families use for it, most common first.
PATHS: dict[str, tuple[str, ...]] = {
    "layers": (
        "model.layers",  # llama, mistral, mixtral, qwen, gemma, phi3, olmo, cohere, granite, ...
        "transformer.h",  # gpt2, gpt_neo, gptj, bloom, falcon, codegen, starcoder
        "gpt_neox.layers",  # pythia
        "model.decoder.layers",  # opt
        "transformer.blocks",  # mpt
        "transformer.layers",
        "backbone.layers",
        "model.language_model.layers",  # multimodal wrappers around a text decoder
    ),
    "final_norm": (
        "model.norm",
        "transformer.ln_f",
        "gpt_neox.final_layer_norm",
        # OPT registers this before its layers, and sets it to None for post-LN checkpoints (opt-350m).
        "model.decoder.final_layer_norm",
        "model.final_layernorm",  # phi-1/2
        "transformer.norm_f",  # mpt
        "backbone.norm_f",
        "model.language_model.norm",
    ),
    "project_out": ("model.decoder.project_out",),  # opt with word_embed_proj_dim != hidden_size
}

# Config attribute -> the multiplier it puts on the logits (absent, None or 1 means no scaling).
LOGIT_MULTIPLIERS: dict[str, Callable[[float], float]] = {
    "logit_scale": lambda value: value,  # cohere: logits * logit_scale
    "logits_scaling": lambda value: 1.0 / value,  # granite: logits / logits_scaling
    "lm_head_multiplier": lambda value: value,  # falcon_h1: logits * lm_head_multiplier
}
# (config.model_type, attribute) -> the multiplier, where a family reads an attribute differently from the table.
LOGIT_MULTIPLIER_OVERRIDES: dict[tuple[str, str], Callable[[float], float]] = {
    ("hyperclovax", "logits_scaling"): lambda value: value,  # HyperCLOVA X multiplies where Granite divides
}

# Config attributes that families use for their context length.
CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")
_SANE_CONTEXT = 2**31  # tokenizers without a limit report ~1e30 as `model_max_length`

NO_NORM = "none"
"""Value of ``final_norm=`` (and of ``final_norm_path``) for post-LN models that have no final norm."""

_MISSING = object()

LogitTransform = Callable[[Tensor], Tensor]
"""One step of what a head does to the unembedding's output: logits [..., vocab] -> logits [..., vocab]."""


def context_length(model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase | None = None) -> int | None:
    """The most tokens the model reads at once: the shortest sane length its config and tokenizer declare.

    None when neither says.
    """
    candidates = []
    if model is not None:
        config = model.config.get_text_config()
        candidates += [getattr(config, name, None) for name in CONTEXT_ATTRIBUTES]
    if tokenizer is not None:
        candidates.append(tokenizer.model_max_length)
    sane = [value for value in candidates if isinstance(value, int) and 0 < value < _SANE_CONTEXT]
    return min(sane, default=None)


@dataclass(frozen=True)
class LogitScale:
    """logits * factor: the product of the `LOGIT_MULTIPLIERS` a config sets."""

    factor: float

    def __call__(self, logits: Tensor) -> Tensor:
        """logits: [..., vocab] -> [..., vocab]."""
        return logits * self.factor


@dataclass(frozen=True)
class LogitSoftcap:
    """cap * tanh(logits / cap): Gemma-2/3's ``final_logit_softcapping``, applied after any scale."""

    cap: float

    def __call__(self, logits: Tensor) -> Tensor:
        """logits: [..., vocab] -> [..., vocab]."""
        return self.cap * torch.tanh(logits / self.cap)


def logit_transforms(config) -> tuple[LogitTransform, ...]:
    """What the model's head does to the unembedding's output, in order, as the text ``config`` declares it."""
    transforms: list[LogitTransform] = []
    scale = _logit_scale(config)
    if scale is not None:
        transforms.append(LogitScale(scale))
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        transforms.append(LogitSoftcap(float(softcap)))
    return tuple(transforms)


def _resolve(model: nn.Module, path: str):
    """The object at dotted ``path`` below ``model``: None if the attribute is None, ``_MISSING`` if absent."""
    obj = model
    for name in path.split("."):
        obj = getattr(obj, name, _MISSING)
        if obj is _MISSING or obj is None:
            return obj
    return obj


def _explicit(model: nn.Module, path: str, part: str, kinds: tuple[type, ...]) -> nn.Module:
    """The module at a user-given path, or a LensLabError naming the argument to fix."""
    module = _resolve(model, path)
    if not isinstance(module, kinds):
        found = "nothing" if module is _MISSING or module is None else type(module).__name__
        expected = " or ".join(kind.__name__ for kind in kinds)
        raise LensLabError(
            f"{part}='{path}' points to {found} in {type(model).__name__} where a {expected} was expected; "
            f"pass the dotted module path, as printed by print(model), with {part}='...'."
        )
    return module


def first_present(model: nn.Module, paths: tuple[str, ...]) -> tuple[str | None, nn.Module | None]:
    """The first of ``paths`` that names a module, as (path, module), else (None, None)."""
    for path in paths:
        module = _resolve(model, path)
        if isinstance(module, nn.Module):
            return path, module
    return None, None


def find_layers(model: nn.Module, path: str | None, config) -> tuple[str | None, nn.ModuleList | None]:
    """Decoder layers: explicit path, else the table, else the one outermost ModuleList of
    ``config.num_hidden_layers`` blocks; (None, None) when none of these finds exactly one."""
    if path is not None:
        return path, _explicit(model, path, "layers", (nn.ModuleList, nn.Sequential))
    found = first_present(model, PATHS["layers"])
    if found[0] is not None:
        return found
    num_layers = getattr(config, "num_hidden_layers", None)
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    # Drop lists nested in another (per-layer expert lists of an MoE can have L entries too).
    outermost = [(n, m) for n, m in lists if not any(n.startswith(f"{other}.") for other, _ in lists)]
    return outermost[0] if len(outermost) == 1 else (None, None)


def find_unembed(model: PreTrainedModel, path: str | None) -> tuple[str, nn.Module]:
    """The unembedding: explicit path, else ``get_output_embeddings()``, with its dotted path."""
    if path is not None:
        return path, _explicit(model, path, "unembed", (nn.Module,))
    module = model.get_output_embeddings()
    if module is None:
        raise LensLabError(
            f"{type(model).__name__}.get_output_embeddings() returned None, so it has no readable language-model "
            "head; load it as a causal LM (AutoModelForCausalLM) or pass unembed='<dotted.path>'."
        )
    name = next(name for name, candidate in model.named_modules() if candidate is module)
    return name, module


def _logit_scale(config) -> float | None:
    """The product of the ``LOGIT_MULTIPLIERS`` the config sets (read through ``LOGIT_MULTIPLIER_OVERRIDES``), None
    when it sets none."""
    scale = 1.0
    for name, multiplier in LOGIT_MULTIPLIERS.items():
        value = getattr(config, name, None)
        if value is not None and value != 1:
            multiplier = LOGIT_MULTIPLIER_OVERRIDES.get((getattr(config, "model_type", None), name), multiplier)
            scale *= multiplier(float(value))
    return None if scale == 1.0 else scale


def _is_norm(module: nn.Module) -> bool:
    """Norm-like by type or by name (families define their own RMSNorm classes)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def final_norm_candidates(model: nn.Module, layers: nn.Module, path: str | None) -> list[tuple[str, nn.Module | None]]:
    """Possible final norms as (path, module), module None meaning post-LN; the first is the likeliest.

    An explicit path or a table entry is the only candidate (a table entry set to None, as in OPT-350m,
    means no final norm). Otherwise every outermost norm-like module outside the layers and not named
    after embeddings competes, and behaviour decides (``ModelView._choose_norm_by_behaviour``).
    """
    if path is not None:
        if path.lower() == NO_NORM:
            return [(NO_NORM, None)]
        return [(path, _explicit(model, path, "final_norm", (nn.Module,)))]
    for candidate in PATHS["final_norm"]:
        module = _resolve(model, candidate)
        if isinstance(module, nn.Module):
            return [(candidate, module)]
        if module is None:
            return [(NO_NORM, None)]
    inside = {id(m) for m in layers.modules()}
    # An embedding norm (BLOOM's word_embeddings_layernorm) is never the final norm.
    norms = [
        (n, m)
        for n, m in model.named_modules()
        if _is_norm(m) and id(m) not in inside and "emb" not in n.rsplit(".", 1)[-1]
    ]
    norms = [(n, m) for n, m in norms if not any(n.startswith(f"{other}.") for other, _ in norms)]
    return norms or [(NO_NORM, None)]
