"""The training objective and its memory-lean backward.

Loss = sum over lens positions l = 0..L-1 of the mean over tokens of KL(p_final || p_lens,l), where p_final is
the model's own next-token distribution (the last position, where every lens is the model itself, adds nothing).
Like tuned-lens, every position's KL is a mean over tokens and the positions are summed, not averaged.

Each position's [batch, seq, vocab] logits are the largest tensors in training, so the gradient is taken one
position at a time: lens logits -> KL -> backward, then the next position. Gradients add up in `.grad`, which
gives the gradient of the summed loss while only one position's logits are ever alive.

KL(p || q) is computed as the soft-target cross-entropy H(p, q) minus the entropy H(p): PyTorch fuses the
cross-entropy with its log-softmax, and H(p) is computed once per batch instead of once per position.

`backward_chunked` is the fast recipe's version of the same gradient: every position's translator and final
norm run under autograd on [positions, tokens, d_model] tensors, and the vocabulary-wide part runs in chunks of
tokens with a hand-written gradient (`lenslab.train.chunked_kl`), so no position's [batch, seq, vocab] logits are
ever whole.
"""

from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lenslab.adapter import ModelView
from lenslab.lenses import Lens
from lenslab.train.chunked_kl import chunked_kl, native_bf16, supports_chunked_kl

log = logging.getLogger(__name__)


class Objective(NamedTuple):
    """How a micro-batch's gradient is computed."""

    chunked: bool
    """All positions at once through the chunked KL (`backward_chunked`, no model logits needed), else one position
    at a time (`backward_by_layer`)."""
    low_precision: bool
    """The chunked KL's vocabulary-wide products in bfloat16."""
    autocast: AbstractContextManager
    """Wraps each position's forward in the one-position-at-a-time backward."""


def choose_objective(view: ModelView, chunked_kl: bool, mixed_precision: bool) -> Objective:
    """The objective a recipe asks for (`Recipe.chunked_kl`), in the precision `TrainConfig.mixed_precision` and the
    hardware allow."""
    chunked = chunked_kl and supports_chunked_kl(view)
    if chunked_kl and not chunked:
        log.warning("The unembedding is not a linear layer, so the KL is computed one position at a time")
    use_bf16 = mixed_precision and view.device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    low_precision = chunked and mixed_precision and native_bf16(view.device)
    return Objective(chunked=chunked, low_precision=low_precision, autocast=autocast)


class Target(NamedTuple):
    """The distribution every lens position is trained to match."""

    probs: Tensor
    """[batch, seq, vocab] float32 p_final, detached."""
    entropy: Tensor
    """Scalar: H(p_final) in nats, summed over the batch's tokens."""


def final_target(logits: Tensor) -> Target:
    """The model's next-token distribution from its logits: [batch, seq, vocab] (any float dtype)."""
    log_probs = logits.detach().float().log_softmax(dim=-1)
    probs = log_probs.exp()
    # entr(p) = -p log p with entr(0) = 0, so tokens the model rules out entirely contribute nothing.
    return Target(probs=probs, entropy=torch.special.entr(probs).sum())


def layer_kl_sum(lens: Lens, h: Tensor, layer: int, target: Target) -> Tensor:
    """Sum over tokens of KL(p_final || p_lens) at lens position `layer`, in nats; differentiable in the lens.

    h: [batch, seq, d_model] residual at that position.
    """
    logits = lens(h, layer).float()  # [batch, seq, vocab]
    cross_entropy = F.cross_entropy(logits.flatten(0, -2), target.probs.flatten(0, -2), reduction="sum")
    return cross_entropy - target.entropy


def backward_by_layer(
    lens: Lens, hidden: list[Tensor], target: Target, scale: float, autocast: AbstractContextManager
) -> Tensor:
    """Add the gradient of `scale` * (summed KL at every position 0..L-1) to the lens's `.grad`s, one position at
    a time; returns the per-position KL sums (nats, summed over tokens), detached: [L].

    hidden: the captured residuals (`Residuals.hidden`), each [batch, seq, d_model]; `autocast` wraps each
    position's forward (a bf16 autocast on GPU, `contextlib.nullcontext()` otherwise).
    """
    sums = []
    for layer in range(lens.view.num_layers):
        with autocast:
            kl = layer_kl_sum(lens, hidden[layer], layer, target)
        (kl * scale).backward()
        sums.append(kl.detach())
    return torch.stack(sums)


def backward_chunked(lens: Lens, hidden: list[Tensor], scale: float, *, low_precision: bool) -> Tensor:
    """Add the gradient of `scale` * (summed KL at every position 0..L-1) to the lens's `.grad`s in one backward;
    returns the per-position KL sums (nats, summed over tokens), detached: [L].

    hidden: the captured residuals, each [batch, seq, d_model] (the model's logits are not needed: the target is
    decoded from hidden[L] chunk by chunk). `low_precision`: see `lenslab.train.chunked_kl`.
    """
    view = lens.view
    with torch.no_grad():
        z_final = view.head_input(hidden[view.num_layers]).flatten(0, -2)  # [tokens, d_unembed]
    z_lens = torch.stack(
        [view.head_input(lens.transform(hidden[layer], layer)) for layer in range(view.num_layers)]
    ).flatten(1, -2)  # [L, tokens, d_unembed]
    sums = chunked_kl(view, z_lens, z_final, low_precision=low_precision)
    (sums.sum() * scale).backward()
    return sums.detach()
