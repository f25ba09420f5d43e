"""Influence of a direction on a lens: the expected KL divergence its ablation causes.

    σ(v) = E_h[ KL( lens(h) ‖ lens(ablate(h, v, r)) ) ]        (nats)

with ``ablate`` and the replacement r from `lenslab.causal.ablation`. Both extraction methods optimise this
quantity and report it the same way: after a basis is found, every direction's influence is recomputed on
the whole sample by `lens_influences`. The *total influence* of a basis is the sum of its k individual
influences (each direction ablated alone), not the influence of ablating the k-dimensional span at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lenslab.causal.ablation import ablate_each
from lenslab.lenses import Lens, row_chunks

MAX_LOGITS_PER_CHUNK = 2**24
"""Upper bound on logits held at once ([directions, tokens, vocab] elements) when evaluating influences."""


def kl_divergence(log_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p ‖ q) per row: log_p [..., vocab] log-probabilities, logits_q [..., vocab] -> [...] nats."""
    log_q = logits_q.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def lens_log_probs(lens: Lens, h: Tensor, layer: int) -> Tensor:
    """The lens's next-token log-probabilities, h: [..., d_model] -> [..., vocab] float32."""
    return lens(h.to(lens.view.dtype), layer).float().log_softmax(-1)


def influence_terms(
    lens: Lens, layer: int, h: Tensor, directions: Tensor, replacement: Tensor, log_p: Tensor
) -> Tensor:
    """Per-token KL of ablating each direction alone, differentiable in ``directions``.

    h: [n, d_model]; directions: [k, d_model]; replacement: [d_model] or [n, d_model];
    log_p: [n, vocab] the lens's clean log-probabilities -> [k, n] nats.
    """
    ablated = ablate_each(h, directions, replacement)  # [k, n, d_model]
    logits = lens(ablated.to(lens.view.dtype), layer)  # [k, n, vocab]
    return kl_divergence(log_p.unsqueeze(0), logits)


def token_chunks(n: int, k: int, vocab: int) -> list[slice]:
    """Slices of range(n) tokens, each small enough that k copies of it keep at most `MAX_LOGITS_PER_CHUNK` logits."""
    return row_chunks(n, k * vocab, MAX_LOGITS_PER_CHUNK)


@torch.no_grad()
def lens_influences(lens: Lens, layer: int, h: Tensor, directions: Tensor, replacement: Tensor) -> Tensor:
    """σ of each direction ablated alone, averaged over all tokens.

    h: [n, d_model] residuals at lens position ``layer``; directions: [k, d_model] (any unit vectors);
    replacement: [d_model] or [n, d_model] (see `Ablation.replacement`) -> [k] float32 nats.
    """
    directions = directions.to(h.device, torch.float32)
    total = torch.zeros(len(directions), device=h.device)
    for rows in token_chunks(len(h), len(directions), lens.view.vocab_size):
        chunk_replacement = replacement[rows] if replacement.ndim == 2 else replacement
        log_p = lens_log_probs(lens, h[rows], layer)
        total += influence_terms(lens, layer, h[rows], directions, chunk_replacement, log_p).sum(-1)
    return total / len(h)
