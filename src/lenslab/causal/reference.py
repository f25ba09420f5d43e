"""The reference causal basis extraction of the tuned lens paper: one direction at a time, L-BFGS, full sample.

Direction j starts from the j-th right singular vector of the unembedding (random when the unembedding is
narrower or wider than the residual stream, as with OPT's project_out) and maximises its influence σ(v)
(`lenslab.causal.influence`) with L-BFGS and a strong Wolfe line search, every evaluation a full pass over
the whole sample. The parameter is kept on the unit sphere of the complement of the directions already found
by projecting it inside the objective. Like tuned-lens 0.2.0 (``extract_causal_bases``), a direction stops
after ``max_evaluations`` objective evaluations or when an L-BFGS step changes σ by less than ``tolerance``
relative. Cost per layer: k × (up to ``max_evaluations``) full forward and backward passes of the lens.

This is the baseline `lenslab.causal.fast` is measured against; see docs/benchmarks.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from lenslab.causal.influence import influence_terms, lens_log_probs, token_chunks
from lenslab.lenses import Lens, row_chunks

logger = logging.getLogger(__name__)

MAX_EVALUATIONS = 100
"""Objective evaluations per direction, as tuned-lens's ``max_iter=100``."""
TOLERANCE = 1e-4
"""Relative change of σ across one L-BFGS step below which a direction is considered converged."""
CACHED_LOGITS = 2**28
"""Largest sample (tokens x vocabulary) whose clean log-probabilities are kept between objective evaluations: 1 GiB
of float32, e.g. 4,096 tokens of a 65k vocabulary. A larger sample has them recomputed, a chunk at a time, at every
evaluation (one more lens forward per chunk), so that memory stays bounded by a chunk, not by the sample."""


def reference_directions(
    lens: Lens,
    layer: int,
    h: Tensor,
    replacement: Tensor,
    k: int,
    *,
    max_evaluations: int = MAX_EVALUATIONS,
    tolerance: float = TOLERANCE,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """k orthonormal directions found greedily, [k, d_model] float32, in the order found (not sorted).

    h: [n, d_model] residuals at lens position ``layer``; replacement: [d_model] or [n, d_model].
    ``progress(j)`` is called after direction j is done.
    """
    d_model = h.shape[-1]
    start = initial_directions(lens, d_model, k, seed).to(h.device)
    found = torch.zeros(0, d_model, device=h.device)
    vocab = lens.view.vocab_size
    chunks = token_chunks(len(h), 1, vocab)

    def clean(rows: slice) -> Tensor:
        with torch.no_grad():
            return lens_log_probs(lens, h[rows], layer)

    # The clean log-probabilities do not depend on the direction: computed once per chunk where they fit.
    cached = [clean(rows) for rows in chunks] if len(h) * vocab <= CACHED_LOGITS else None

    for j in range(k):
        complement = torch.eye(d_model, device=h.device) - found.T @ found

        def on_sphere(x: Tensor) -> Tensor:
            x = complement @ x
            return x / (x.norm() + torch.finfo(x.dtype).eps)

        v = torch.nn.Parameter(on_sphere(start[j]))
        optimizer = torch.optim.LBFGS([v], line_search_fn="strong_wolfe", max_iter=max_evaluations)
        evaluations = 0
        energy = previous = 0.0

        def closure() -> Tensor:
            nonlocal evaluations, energy, previous
            evaluations += 1
            v.grad = torch.zeros_like(v)
            total = 0.0
            # A gradient per chunk: it accumulates in v without holding every chunk's graph. Taken with respect to
            # v alone, not by backward(), which would also fill a [vocab, d_model] .grad of the model's
            # unembedding (and the lens's own) wherever those still require gradients.
            for index, rows in enumerate(chunks):
                log_p = clean(rows) if cached is None else cached[index]
                direction = on_sphere(v).unsqueeze(0)  # [1, d_model], rebuilt per chunk: each gradient frees it
                chunk_replacement = replacement[rows] if replacement.ndim == 2 else replacement
                kl = influence_terms(lens, layer, h[rows], direction, chunk_replacement, log_p).sum()
                v.grad += torch.autograd.grad(-kl / len(h), v)[0]
                total += kl.item()
            previous, energy = energy, total / len(h)
            return torch.tensor(-energy)

        while evaluations < max_evaluations:
            optimizer.step(closure)
            with torch.no_grad():
                v.copy_(on_sphere(v))
            if abs(energy - previous) <= tolerance * abs(energy):
                break
        logger.debug(
            "reference direction %d at position %d: σ=%.4g after %d evaluations", j, layer, energy, evaluations
        )
        found = torch.cat([found, on_sphere(v.detach()).unsqueeze(0)])
        if progress is not None:
            progress(j)
    return found


def initial_directions(lens: Lens, d_model: int, k: int, seed: int = 0) -> Tensor:
    """The reference's starting directions, [k, d_model] orthonormal: the unembedding's top right singular
    vectors (the residual directions the logits are most sensitive to), or random ones if the widths differ."""
    weight = lens.view.unembedding_weight().detach()  # [vocab, d_unembed]
    if weight.shape[1] == d_model:
        # Right singular vectors = eigenvectors of WᵀW ([d_model, d_model], all d_model of them even when the
        # vocabulary is smaller), largest first. WᵀW is summed over slices of the vocabulary: a float64 copy of a
        # whole 262k-token unembedding would be gigabytes.
        gram = torch.zeros(d_model, d_model, dtype=torch.float64, device=weight.device)
        for rows in row_chunks(len(weight), d_model):
            piece = weight[rows].double()
            gram += piece.T @ piece
        return torch.linalg.eigh(gram).eigenvectors.flip(-1).T[:k].float()
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d_model, k, generator=generator)).Q.T
