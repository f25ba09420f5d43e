"""ModelView: where a Hugging Face causal LM keeps its layers, final norm and unembedding.

This is the only module that knows architectures, and it knows them as a table: each canonical part
maps to the attribute paths that families use for it. A model outside the table is read by structure
(the one ``nn.ModuleList`` as long as ``config.num_hidden_layers``; for the final norm, the norm-like
module outside the layers that runs after them), and any part can be named explicitly. Whatever was
found is then checked by behaviour: one tiny forward, after which decoding the last residual must
reproduce the model's own logits.

>>> from transformers import AutoModelForCausalLM, LlamaConfig
>>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
...                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
>>> view = ModelView.from_model(AutoModelForCausalLM.from_config(config))
>>> view.layers_path, view.final_norm_path, view.unembed_path, view.num_positions
('model.layers', 'model.norm', 'lm_head', 3)
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.activations import FastGELUActivation, NewGELUActivation

from lenslab.errors import LensLabError
from lenslab.residuals import Residuals, capture_residuals

logger = logging.getLogger(__name__)

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

FUSABLE_ACTIVATIONS = (NewGELUActivation, FastGELUActivation)
"""transformers' activation modules written as Python arithmetic that compute PyTorch's tanh-approximate GELU (the
same function, up to rounding): GPT-2, GPT-J, GPT-Neo, CodeGen and Phi-1/2 use them. Each makes about seven passes
over a layer's [batch, seq, d_ff] activations where `nn.GELU(approximate="tanh")` makes one."""

# Config attributes that families use for their context length.
CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")
_SANE_CONTEXT = 2**31  # tokenizers without a limit report ~1e30 as `model_max_length`

NO_NORM = "none"
"""Value of ``final_norm=`` (and of ``final_norm_path``) for post-LN models that have no final norm."""

_MISSING = object()

# Validation tolerance on logits, relative to their magnitude: float32 decodes reproduce the model's
# own arithmetic almost exactly; half precision gets a few units in the last place.
_RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6, torch.float16: 1e-2, torch.bfloat16: 6e-2}


@dataclass
class ModelView:
    """The parts of a causal LM that a lens needs, found once and validated.

    Lens positions run from 0 (the input of layer 0, after any embedding scaling or normalisation)
    to L (the output of the last layer, before the final norm); ``decode`` maps any of them to logits
    the way the model maps position L.
    """

    model: PreTrainedModel = field(repr=False)
    """The wrapped model (eval mode; callers freeze it)."""
    layers: nn.ModuleList = field(repr=False)
    """Decoder blocks, ``len == num_layers`` (an ``nn.Sequential`` of blocks when given explicitly)."""
    final_norm: nn.Module | None = field(repr=False)
    """Norm applied to the last residual; None for post-LN models whose last layer output is normalised."""
    unembed: nn.Module = field(repr=False)
    """``model.get_output_embeddings()``: a Linear from d_unembed to vocab, bias included when present."""
    project_out: nn.Module | None = field(repr=False)
    """Projection between the final norm and the unembedding (OPT's ``project_out``), else None."""
    logit_softcap: float | None
    """Gemma-2/3 ``final_logit_softcapping``: logits = cap * tanh(logits / cap); None when absent."""
    logit_scale: float | None
    """Multiplier on the logits (Cohere's ``logit_scale``, 1 / Granite's ``logits_scaling``); None when absent."""
    layers_path: str
    """Dotted attribute path of ``layers`` (what ``from_model(layers=...)`` takes)."""
    final_norm_path: str
    """Dotted attribute path of ``final_norm``, or ``"none"`` when there is none."""
    unembed_path: str
    """Dotted attribute path of ``unembed``."""
    project_out_path: str | None = None
    """Dotted attribute path of ``project_out``, None when there is none."""

    @classmethod
    def from_model(
        cls,
        model: PreTrainedModel,
        *,
        layers: str | None = None,
        final_norm: str | None = None,
        unembed: str | None = None,
        validate: bool = True,
    ) -> ModelView:
        """Find the parts of ``model``; explicit dotted paths override discovery.

        ``final_norm="none"`` declares a post-LN model without a final norm. With ``validate`` one
        tiny forward checks the residual shapes and that decoding the last residual reproduces the
        model's logits; discovery of an unlisted final norm needs that forward too.
        """
        config = model.config.get_text_config()
        layers_path, layer_list = _find_layers(model, layers, config)
        if layers_path is None:
            raise LensLabError(
                f"Could not find the decoder layers of {type(model).__name__} (tried {', '.join(PATHS['layers'])} "
                f"and a ModuleList of num_hidden_layers={getattr(config, 'num_hidden_layers', '?')} blocks); "
                "pass their dotted path, e.g. ModelView.from_model(model, layers='model.layers', "
                "final_norm='model.norm')."
            )
        unembed_path, unembed_module = _find_unembed(model, unembed)
        project_out_path, project_out = _first_present(model, PATHS["project_out"])
        softcap = getattr(config, "final_logit_softcapping", None)
        view = cls(
            model=model,
            layers=layer_list,
            final_norm=None,
            unembed=unembed_module,
            project_out=project_out,
            logit_softcap=float(softcap) if softcap else None,
            logit_scale=_logit_scale(config),
            layers_path=layers_path,
            final_norm_path=NO_NORM,
            unembed_path=unembed_path,
            project_out_path=project_out_path,
        )
        candidates = _final_norm_candidates(model, layer_list, final_norm)
        if validate:
            view._choose_norm_by_behaviour(candidates, explicit=final_norm is not None)
        elif len(candidates) == 1:
            view.final_norm_path, view.final_norm = candidates[0]
        else:
            names = ", ".join(path for path, _ in candidates)
            raise LensLabError(
                f"Found several possible final norms ({names}) in {type(model).__name__} and cannot choose without "
                "a forward pass; pass final_norm='<path>' (or 'none') or validate=True."
            )
        logger.info("ModelView for %s: %s", type(model).__name__, view)
        return view

    @property
    def num_layers(self) -> int:
        """L, the number of decoder layers."""
        return len(self.layers)

    @property
    def num_positions(self) -> int:
        """L + 1 lens positions: 0 = input of layer 0, l = output of layer l - 1."""
        return len(self.layers) + 1

    @property
    def d_model(self) -> int:
        """Width of the residual stream (OPT-350m: hidden_size, not word_embed_proj_dim)."""
        return self.model.config.get_text_config().hidden_size

    @property
    def vocab_size(self) -> int:
        """Width of the logits (rows of the unembedding, padding included)."""
        return self.unembed.weight.shape[0]  # the shape alone: an offloaded weight stays on disk

    @property
    def device(self) -> torch.device:
        """Device of the model's head, where ``decode`` runs and logits land; input ids can be given there too.

        For a model on one device, that device. A model dispatched over several with a device map (accelerate) moves
        its inputs to each layer itself and returns its logits on the device of its input ids.
        """
        return execution_device(self.unembed, self.model.device)

    def residual_device(self, position: int) -> torch.device:
        """Device the residual at lens ``position`` is computed on, where a tuned lens keeps its translator:
        layer ``position - 1``'s, and layer 0's for position 0 (the input it reads)."""
        return execution_device(self.layers[max(position - 1, 0)], self.device)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model's parameters."""
        return self.model.dtype

    def decode(self, h: Tensor) -> Tensor:
        """Logits from residuals the way the model makes them from its last one.

        h: [..., d_model] on any device -> logits [..., vocab] on ``device``: final_norm -> project_out -> unembed ->
        scale -> softcap, each part run on its own device.
        """
        for part in (self.final_norm, self.project_out):
            if part is not None:
                h = part(h.to(execution_device(part, h.device)))
        logits = self.unembed(h.to(self.device))
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logit_softcap is not None:
            logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        return logits

    def unembedding_weight(self) -> Tensor:
        """The unembedding matrix, [vocab, d_unembed], on ``device`` (see ``_unembedding_tensor``)."""
        return self._unembedding_tensor("weight")

    def unembedding_bias(self) -> Tensor | None:
        """The unembedding's bias, [vocab], on ``device`` (see ``_unembedding_tensor``); None when it has none."""
        return self._unembedding_tensor("bias")

    def _unembedding_tensor(self, name: str) -> Tensor | None:
        """The unembedding's parameter ``name`` (None when absent), read from accelerate's offload (CPU memory or
        disk) when a device map keeps it there: the module's own tensor is then an empty one on the meta device
        between forwards."""
        if not getattr(getattr(self.unembed, "_hf_hook", None), "offload", False):
            return getattr(self.unembed, name, None)
        from accelerate.utils import align_module_device  # installed: its hook is on the module

        with align_module_device(self.unembed):
            return getattr(self.unembed, name, None)

    def capture(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        positions: list[int] | None = None,
        need_logits: bool = True,
    ) -> Residuals:
        """Residuals at the lens positions from one forward; see ``lenslab.residuals.capture_residuals``."""
        return capture_residuals(
            self, input_ids, attention_mask, positions=positions, need_logits=need_logits
        )

    @contextmanager
    def fused_activations(self) -> Iterator[None]:
        """Run the model's `FUSABLE_ACTIVATIONS` as `nn.GELU(approximate="tanh")` while inside; restored on exit.

        For training, where the frozen model's forward is repeated for every micro-batch: on the Austen GPT-2 on
        CPU its Python GELU took about a fifth of the forward, and the residuals differ by float32 rounding only.
        """
        swapped = [
            (parent, name, child)
            for parent in self.model.modules()
            for name, child in parent.named_children()
            if isinstance(child, FUSABLE_ACTIVATIONS)
        ]
        try:
            for parent, name, _ in swapped:
                setattr(parent, name, nn.GELU(approximate="tanh"))
            yield
        finally:
            for parent, name, child in swapped:
                setattr(parent, name, child)

    def _choose_norm_by_behaviour(self, candidates: list[tuple[str, nn.Module | None]], explicit: bool) -> None:
        """Keep the first final-norm candidate with which ``decode`` reproduces the model's logits.

        Unless the candidate is explicit, norms that do not run after the last layer (embedding norms)
        are dropped and "no final norm" is tried last.
        """
        residuals, run_after = self._probe([module for _, module in candidates if module is not None])
        if not explicit:
            candidates = [(p, m) for p, m in candidates if m is None or id(m) in run_after]
            candidates += [] if any(m is None for _, m in candidates) else [(NO_NORM, None)]
        logits = residuals.logits.float()
        tolerance = _RELATIVE_TOLERANCE.get(self.dtype, 1e-2) * (1.0 + logits.abs().max().item())
        differences = []
        for path, module in candidates:
            self.final_norm_path, self.final_norm = path, module
            try:
                with torch.no_grad():
                    difference = (self.decode(residuals.hidden[-1]).float() - logits).abs().max().item()
            except RuntimeError as exc:  # the parts found do not fit together (a width mismatch)
                logger.debug("decode with final_norm=%s failed: %s", path, exc)
                difference = float("inf")
            if difference <= tolerance:
                return
            differences.append(f"{difference:.3g} with final_norm='{path}'")
        raise LensLabError(
            f"Decoding the last residual of {type(self.model).__name__} does not reproduce its logits (max abs "
            f"difference {', '.join(differences)}, tolerance {tolerance:.3g}, unembed='{self.unembed_path}'), so "
            "the final norm or the unembedding is likely wrong; pass final_norm='<dotted.path>' (or 'none' for "
            "post-LN models) and/or unembed='<dotted.path>'."
        )

    def _probe(self, norms: list[nn.Module]) -> tuple[Residuals, set[int]]:
        """One tiny forward: its residuals (shape-checked) and the ids of the ``norms`` that ran after the last layer."""
        embedding = self.model.get_input_embeddings()
        # Ids from 3 up skip the usual pad/bos/eos ids, which some models warn about without a mask.
        ids = 3 + torch.arange(8, device=self.device) * 7 % (embedding.num_embeddings - 3)
        input_ids = ids.view(2, 4)  # [batch, seq]
        finished: list[int] = []  # module ids in the order their forward returned
        handles = [
            module.register_forward_hook(lambda module, args, output: finished.append(id(module)))
            for module in (*norms, self.layers[-1])
        ]
        try:
            with torch.no_grad():
                residuals = self.capture(input_ids)
        finally:
            for handle in handles:
                handle.remove()
        expected = (*input_ids.shape, self.d_model)
        for position, h in enumerate(residuals.hidden):
            if h is None or tuple(h.shape) != expected:
                raise LensLabError(
                    f"Lens position {position} of {type(self.model).__name__} captured "
                    f"{'nothing' if h is None else list(h.shape)} where {list(expected)} was expected, so "
                    f"layers='{self.layers_path}' is likely not the decoder layer list; pass the right one with "
                    "layers='<dotted.path>'."
                )
        last_layer_done = len(finished) - finished[::-1].index(id(self.layers[-1]))
        return residuals, set(finished[last_layer_done:])


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


def execution_device(module: nn.Module, default: torch.device) -> torch.device:
    """The device ``module`` computes on.

    In a model dispatched with a device map, the execution device of the accelerate hook on the module, to which its
    inputs and weights are brought for each forward (the weights may rest in CPU memory, or on disk with an empty
    tensor on the meta device in their place). Otherwise the device of its first parameter or buffer, and ``default``
    for a module that has neither (a norm without weights computes wherever its input is).
    """
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device(device)
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return default if tensor is None else tensor.device


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


def _first_present(model: nn.Module, paths: tuple[str, ...]) -> tuple[str | None, nn.Module | None]:
    """The first of ``paths`` that names a module, as (path, module), else (None, None)."""
    for path in paths:
        module = _resolve(model, path)
        if isinstance(module, nn.Module):
            return path, module
    return None, None


def _find_layers(model: nn.Module, path: str | None, config) -> tuple[str | None, nn.ModuleList | None]:
    """Decoder layers: explicit path, else the table, else the one outermost ModuleList of
    ``config.num_hidden_layers`` blocks; (None, None) when none of these finds exactly one."""
    if path is not None:
        return path, _explicit(model, path, "layers", (nn.ModuleList, nn.Sequential))
    found = _first_present(model, PATHS["layers"])
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


def _find_unembed(model: PreTrainedModel, path: str | None) -> tuple[str, nn.Module]:
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


def _final_norm_candidates(
    model: nn.Module, layers: nn.Module, path: str | None
) -> list[tuple[str, nn.Module | None]]:
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
