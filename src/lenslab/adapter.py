"""ModelView: where a Hugging Face causal LM keeps its layers, final norm and unembedding, found once and validated.

The parts are found through the architecture table of `lenslab.architectures` (or given explicitly). Whatever was
found is then checked by behaviour: one tiny forward, after which decoding the last residual must reproduce the
model's own logits. The view then decodes residuals as the model's head does (`ModelView.decode`), and exposes that
head's pieces (`head_input`, the unembedding's tensors, `transform_logits`) for code that must compose them
differently, such as the chunked KL of training, so that no one else re-implements the head.

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
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.activations import FastGELUActivation, NewGELUActivation

from lenslab.architectures import (
    NO_NORM,
    PATHS,
    LogitScale,
    LogitTransform,
    final_norm_candidates,
    find_layers,
    find_unembed,
    first_present,
    logit_transforms,
)
from lenslab.errors import LensLabError
from lenslab.residuals import Residuals, capture_residuals

logger = logging.getLogger(__name__)

FUSABLE_ACTIVATIONS = (NewGELUActivation, FastGELUActivation)
"""transformers' activation modules written as Python arithmetic that compute PyTorch's tanh-approximate GELU (the
same function, up to rounding): GPT-2, GPT-J, GPT-Neo, CodeGen and Phi-1/2 use them. Each makes about seven passes
over a layer's [batch, seq, d_ff] activations where `nn.GELU(approximate="tanh")` makes one."""

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
    logit_transforms: tuple[LogitTransform, ...]
    """What the head does to the unembedding's output, in order (`lenslab.architectures.LogitScale`, then
    `LogitSoftcap`); empty for most models. `transform_logits` applies them, in evaluation and training alike."""
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
        layers_path, layer_list = find_layers(model, layers, config)
        if layers_path is None:
            raise LensLabError(
                f"Could not find the decoder layers of {type(model).__name__} (tried {', '.join(PATHS['layers'])} "
                f"and a ModuleList of num_hidden_layers={getattr(config, 'num_hidden_layers', '?')} blocks); "
                "pass their dotted path, e.g. ModelView.from_model(model, layers='model.layers', "
                "final_norm='model.norm')."
            )
        unembed_path, unembed_module = find_unembed(model, unembed)
        project_out_path, project_out = first_present(model, PATHS["project_out"])
        view = cls(
            model=model,
            layers=layer_list,
            final_norm=None,
            unembed=unembed_module,
            project_out=project_out,
            logit_transforms=logit_transforms(config),
            layers_path=layers_path,
            final_norm_path=NO_NORM,
            unembed_path=unembed_path,
            project_out_path=project_out_path,
        )
        candidates = final_norm_candidates(model, layer_list, final_norm)
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
        logger.debug("ModelView for %s: %s", type(model).__name__, view)
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

        h: [..., d_model] on any device -> logits [..., vocab] on ``device``: `head_input` (final_norm ->
        project_out) -> unembed -> `transform_logits`, each part run on its own device.
        """
        return self.transform_logits(self.unembed(self.head_input(h).to(self.device)))

    def head_input(self, h: Tensor) -> Tensor:
        """What the unembedding reads: the final norm and ``project_out`` applied to ``h``, each on its own device.

        h: [..., d_model] on any device -> [..., d_unembed] on the device of the last part that ran (h's when none).
        """
        for part in (self.final_norm, self.project_out):
            if part is not None:
                h = part(h.to(execution_device(part, h.device)))
        return h

    def transform_logits(self, logits: Tensor) -> Tensor:
        """The head's logits from the unembedding's output: ``logit_transforms`` applied in order.

        logits: [..., vocab] -> [..., vocab], on any device and in any float dtype; the input is not modified.
        """
        for transform in self.logit_transforms:
            logits = transform(logits)
        return logits

    @property
    def logit_multiplier(self) -> float | None:
        """c where ``transform_logits(x) == c * x``: the product of the factors when every transform is a
        `LogitScale` (1.0 when there are none); None for any other transform (a softcap), whose code paths must call
        `transform_logits` itself rather than scale."""
        if not all(isinstance(transform, LogitScale) for transform in self.logit_transforms):
            return None
        return math.prod((transform.factor for transform in self.logit_transforms), start=1.0)

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
        return capture_residuals(self, input_ids, attention_mask, positions=positions, need_logits=need_logits)

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
        """One tiny forward: its residuals (shape-checked) and the ids of the ``norms`` that ran after the last
        layer."""
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
