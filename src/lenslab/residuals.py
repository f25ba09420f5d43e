"""Residual capture: the residual stream at every lens position from one forward pass.

Lens position 0 is the input of layer 0 (after embedding scaling, BLOOM's embedding layernorm or
OPT's project_in), position l the output of layer l - 1, and position L the last layer's output
before the final norm. Hooks read them, rather than ``output_hidden_states``, because Hugging Face's
last hidden state already has the final norm applied in most families.

>>> import torch
>>> from transformers import AutoModelForCausalLM, GPT2Config
>>> from lenslab.adapter import ModelView
>>> config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2)
>>> view = ModelView.from_model(AutoModelForCausalLM.from_config(config))
>>> res = capture_residuals(view, torch.tensor([[5, 6, 7]]), positions=[0, 1], need_logits=False)
>>> [None if h is None else tuple(h.shape) for h in res.hidden], res.logits
([(1, 3, 16), (1, 3, 16), None], None)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import NamedTuple, Protocol

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lenslab.errors import LensLabError


class LayeredModel(Protocol):
    """What residual capture reads of a model: `lenslab.adapter.ModelView` is one. A protocol rather than the
    view itself, because the view validates the parts it finds with a capture, so the adapter imports this module."""

    @property
    def model(self) -> nn.Module:
        """The causal LM, called with ``input_ids`` (and optionally ``attention_mask``, ``position_ids``)."""

    @property
    def layers(self) -> nn.ModuleList | nn.Sequential:
        """Its decoder blocks, in order."""

    @property
    def num_positions(self) -> int:
        """L + 1 lens positions."""


class Residuals(NamedTuple):
    """What one forward pass captured."""

    hidden: list[Tensor | None]
    """Length L + 1; ``hidden[p]``: [batch, seq, d_model] residual at lens position p, None if not requested."""
    logits: Tensor | None
    """[batch, seq, vocab] the model's own output logits; None when not needed (the forward may have stopped early)."""


class _StopForward(Exception):
    """Raised by the hook of the last requested layer to skip the rest of the forward."""


def capture_residuals(
    view: LayeredModel,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    positions: list[int] | None = None,
    need_logits: bool = True,
) -> Residuals:
    """Residuals at the requested lens positions, and optionally the logits, from one forward.

    input_ids, attention_mask: [batch, seq]. ``positions`` (default: all L + 1) may be negative,
    counting from the end. With ``need_logits=False`` the forward stops after the last requested
    layer. With an attention mask, position ids follow it as in ``generate()``, so a left-padded row
    gives the same residuals at its real tokens as the unpadded sequence. Runs under the caller's
    grad mode; the tensors are the model's own, not copies, each on the device its layer ran on (which
    differs between layers in a model spread by a device map). Hooks are removed even on errors.
    """
    num_positions = view.num_positions
    wanted = range(num_positions) if positions is None else positions
    if any(not -num_positions <= p < num_positions for p in wanted):
        raise LensLabError(
            f"Requested lens positions {list(wanted)} but {type(view.model).__name__} has positions "
            f"0..{num_positions - 1}; pass positions within that range (or None for all)."
        )
    wanted = sorted({p % num_positions for p in wanted})
    hidden: list[Tensor | None] = [None] * num_positions
    if not wanted and not need_logits:
        return Residuals(hidden=hidden, logits=None)
    stop_at = None if need_logits else wanted[-1]

    def store(position: int, h: Tensor) -> None:
        hidden[position] = h
        if position == stop_at:
            raise _StopForward

    handles = [hook_residual(view, p, partial(store, p)) for p in wanted]
    try:
        output = view.model(**_forward_kwargs(view, input_ids, attention_mask))
    except _StopForward:
        output = None
    finally:
        for handle in handles:
            handle.remove()
    return Residuals(hidden=hidden, logits=output.logits if need_logits else None)


def hook_residual(view: LayeredModel, position: int, fn: Callable[[Tensor], Tensor | None]) -> RemovableHandle:
    """Call ``fn(h)`` on the residual at lens ``position`` during every forward; a returned tensor replaces h.

    h: [batch, seq, d_model]. Position 0 is seen just before layer 0 runs (a pre-hook), position l > 0 when
    layer l - 1 returns. The one place that knows where lens positions live in the forward pass.
    """
    if position == 0:

        def before_first_layer(module, args, kwargs):
            # transformers 5 may pass hidden_states by keyword.
            replacement = fn(args[0] if args else kwargs["hidden_states"])
            if replacement is None:
                return None
            if args:
                return (replacement, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": replacement}

        return view.layers[0].register_forward_pre_hook(before_first_layer, with_kwargs=True)

    def after_layer(module, args, output):
        # Layers return the hidden states alone or first in a tuple.
        in_tuple = isinstance(output, (tuple, list))
        replacement = fn(output[0] if in_tuple else output)
        if replacement is None:
            return None
        return type(output)((replacement, *output[1:])) if in_tuple else replacement

    return view.layers[position - 1].register_forward_hook(after_layer)


def _forward_kwargs(view: LayeredModel, input_ids: Tensor, attention_mask: Tensor | None) -> dict:
    """Keyword arguments for the model's forward: no KV cache, and mask-following position ids."""
    accepts = inspect.signature(view.model.forward).parameters
    kwargs: dict = {"input_ids": input_ids}
    if "use_cache" in accepts:
        kwargs["use_cache"] = False
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    # Position ids count from 0 at every row's first real token, as generate() does; some families
    # (GPT-2, GPT-Neo) would otherwise count the pads, so a left-padded row would not match its sequence.
    if attention_mask is not None and "position_ids" in accepts:
        position_ids = attention_mask.long().cumsum(-1) - 1
        kwargs["position_ids"] = position_ids.masked_fill(attention_mask == 0, 1)
    return kwargs
