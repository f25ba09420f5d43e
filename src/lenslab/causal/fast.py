"""Fast causal basis extraction: a Fisher-surrogate start, then the whole k-frame at once on small minibatches.

The reference (`lenslab.causal.reference`) spends k × ~25 full passes over the sample per layer, each on one
direction. This method spends a few passes' worth in total:

1. **Gradient sketch** (one forward and ``gradient_samples`` backward passes over the sample). Ablating v moves h
   by ``a v`` with a = (r - h)·v. To second order KL(p ‖ q) ≈ ½ a² vᵀ F_h v, where F_h = E_{y~p}[g gᵀ] is the
   Fisher information of the lens output with respect to the residual, g = ∇_h log q(y | h). Sampled tokens y
   give per-token estimates of vᵀ F_h v, hence the surrogate (bent to grow like the true KL, see
   ``_surrogate_terms``)

       σ̃(v) = E_h[ sqrt(1 + a² vᵀ F_h v) - 1 ].

2. **Surrogate ascent** (no lens passes). From the top-k eigenvectors of E[g gᵀ], maximise Σ_j σ̃(v_j) over
   orthonormal frames.
3. **Start** = the better, by exact total influence on a few hundred tokens, of that frame and the reference's
   own start (the unembedding's top singular vectors), so the search never starts worse than the reference.
4. **Exact refinement**. Maximise the real total influence Σ_j σ(v_j) with Adam on minibatches of tokens. The
   frame is the Q factor of an unconstrained [d_model, k] matrix (a QR retraction), so every iterate is exactly
   orthonormal. Influence is concentrated on few tokens (often 10% of tokens carry most of it), so tokens are
   drawn by importance: half uniformly, half in proportion to their surrogate influence, with weights that keep
   the objective unbiased.

Optimising the k directions jointly targets the sum that is reported; the greedy reference's frame is one
feasible point of that problem. Defaults were chosen by measurement (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lenslab.causal.influence import influence_terms, lens_influences, lens_log_probs, token_chunks
from lenslab.causal.reference import initial_directions
from lenslab.errors import LensLabError
from lenslab.lenses import Lens

logger = logging.getLogger(__name__)


@dataclass
class FastConfig:
    """Settings of the fast extraction; the defaults were chosen by measurement (docs/benchmarks.md)."""

    gradient_samples: int = 2
    """Sampled next tokens per residual for the Fisher sketch (each costs one backward pass over the sample)."""
    surrogate_steps: int = 100
    """Adam steps on the surrogate (cheap: no lens passes)."""
    surrogate_lr: float = 0.1
    """Peak Adam learning rate on the surrogate (cosine decay to zero)."""
    selection_tokens: int = 256
    """Tokens on which the surrogate's frame and the reference's start are compared (forward passes only)."""
    steps: int = 60
    """Adam steps on the exact total influence."""
    batch_tokens: int = 64
    """Tokens per exact step (each step decodes k ablated copies of them)."""
    lr: float = 0.1
    """Peak Adam learning rate of the exact steps (cosine decay to zero)."""
    uniform_share: float = 0.5
    """Share of the token-sampling distribution that is uniform; the rest follows the surrogate's per-token
    influence. The uniform part bounds the importance weights (by 1 / uniform_share)."""

    def __post_init__(self) -> None:
        if (
            self.steps < 0
            or self.surrogate_steps < 0
            or min(self.batch_tokens, self.gradient_samples, self.selection_tokens) < 1
        ):
            raise LensLabError(f"FastConfig needs non-negative step counts and positive sizes, got {self}.")
        if not 0 < self.uniform_share <= 1:
            raise LensLabError(f"FastConfig.uniform_share is {self.uniform_share}; pass a share in (0, 1].")


def fast_directions(
    lens: Lens,
    layer: int,
    h: Tensor,
    replacement: Tensor,
    k: int,
    *,
    config: FastConfig | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """k orthonormal directions found jointly, [k, d_model] float32 (not sorted).

    h: [n, d_model] residuals at lens position ``layer``; replacement: [d_model] or [n, d_model].
    ``progress(step)`` is called after each exact step.
    """
    config = config or FastConfig()
    generator = torch.Generator(device=h.device).manual_seed(seed)
    displacement = (replacement - h.float()).expand_as(h)  # [n, d_model]
    gradients = _sampled_gradients(lens, layer, h, config.gradient_samples, generator)  # [s, n, d_model]
    surrogate = _surrogate_frame(displacement, gradients, k, config)
    reference = initial_directions(lens, h.shape[-1], k, seed).to(h.device)
    rows = torch.randperm(len(h), generator=generator, device=h.device)[: config.selection_tokens]
    selection_replacement = replacement[rows] if replacement.ndim == 2 else replacement
    scores = [lens_influences(lens, layer, h[rows], frame, selection_replacement) for frame in (surrogate, reference)]
    best = 0 if scores[0].sum() >= scores[1].sum() else 1
    logger.debug("position %d: start totals %s, starting from the %s frame", layer, [float(s.sum()) for s in scores],
                 ("surrogate", "reference")[best])  # fmt: skip
    # The QR retraction leaves its first column free and orthogonalises each later one against those before,
    # so the most influential start direction goes first.
    start = (surrogate, reference)[best][scores[best].argsort(descending=True)]
    probabilities = _sampling_probabilities(_surrogate_terms(displacement, gradients, start.T).sum(-1), config)
    return _refine(lens, layer, h, replacement, start, probabilities, config, generator, progress)


def _sampling_probabilities(token_influence: Tensor, config: FastConfig) -> Tensor:
    """[n] probabilities of drawing each token: a uniform share plus the rest by surrogate influence [n]."""
    uniform = torch.full_like(token_influence, 1.0 / len(token_influence))
    total = token_influence.sum()
    if not total > 0:  # nothing moves (e.g. every residual equals its replacement): sample uniformly
        return uniform
    return config.uniform_share * uniform + (1 - config.uniform_share) * token_influence / total


def _sampled_gradients(lens: Lens, layer: int, h: Tensor, samples: int, generator: torch.Generator) -> Tensor:
    """g = ∇_h log q(y | h) with y drawn from the lens's own prediction, [samples, n, d_model]."""
    out = torch.empty(samples, *h.shape, device=h.device)
    for rows in token_chunks(len(h), 1, lens.view.vocab_size):
        x = h[rows].float().requires_grad_(True)
        log_q = lens_log_probs(lens, x, layer)  # [chunk, vocab]
        for s in range(samples):
            y = torch.multinomial(log_q.detach().exp(), 1, generator=generator)  # [chunk, 1]
            # Tokens are independent, so the gradient of the sum is every token's own gradient.
            (grad,) = torch.autograd.grad(log_q.gather(-1, y).sum(), x, retain_graph=s < samples - 1)
            out[s, rows] = grad
    return out


def _surrogate_terms(displacement: Tensor, gradients: Tensor, frame: Tensor) -> Tensor:
    """Surrogate influence of each token and direction, [n, k].

    displacement: [n, d_model] r - h; gradients: [s, n, d_model]; frame: [d_model, k]. The second-order term
    x = ½ a² vᵀ F_h v is bent to sqrt(1 + 2x) - 1: KL grows quadratically for small moves but only about linearly
    in the logit shift for large ones, and tokens with huge displacements must not dominate.
    """
    samples, n, d_model = gradients.shape
    along_g = (gradients.reshape(samples * n, d_model) @ frame).square()  # one 2-D matmul: far faster than 3-D
    curvature = along_g.view(samples, n, -1).mean(0)  # vᵀ F_h v per token: [n, k]
    quadratic = 0.5 * (displacement @ frame).square() * curvature
    return torch.sqrt(1 + 2 * quadratic) - 1


def _surrogate_frame(displacement: Tensor, gradients: Tensor, k: int, config: FastConfig) -> Tensor:
    """Orthonormal [k, d_model] frame maximising the summed surrogate Σ_j σ̃(v_j)."""
    g = gradients.flatten(0, 1)
    fisher = g.T @ g / len(g)  # E[g gᵀ], [d_model, d_model]
    start = torch.linalg.eigh(fisher.double()).eigenvectors[:, -k:].flip(-1).float()  # [d_model, k]

    def objective(frame: Tensor) -> Tensor:
        return _surrogate_terms(displacement, gradients, frame).mean(0).sum()

    return _stiefel_ascent(objective, start, config.surrogate_steps, config.surrogate_lr).T


def _refine(
    lens: Lens,
    layer: int,
    h: Tensor,
    replacement: Tensor,
    frame: Tensor,
    probabilities: Tensor,
    config: FastConfig,
    generator: torch.Generator,
    progress: Callable[[int], None] | None,
) -> Tensor:
    """Adam on importance-sampled minibatches of the exact summed influence, [k, d_model] -> [k, d_model]."""
    n, k = len(h), len(frame)

    def objective(q: Tensor) -> Tensor:
        rows = torch.multinomial(probabilities, config.batch_tokens, replacement=True, generator=generator)
        # E[weight * term] over the sampling = the uniform mean; divided by the batch, the sum is the batch mean.
        weights = 1.0 / (n * probabilities[rows] * len(rows))
        # The k ablated copies of the batch are decoded a chunk of tokens at a time and each chunk's gradient is
        # taken at once, freeing its [k, chunk, vocab] graph; the sums return as a stand-in linear in q with the
        # objective's value and gradient, which the caller's backward carries on through the QR retraction.
        leaf = q.detach().requires_grad_(True)
        value, grad = torch.zeros((), device=h.device), torch.zeros_like(q)
        for chunk in token_chunks(len(rows), k, lens.view.vocab_size):
            chosen = rows[chunk]
            chunk_replacement = replacement[chosen] if replacement.ndim == 2 else replacement
            with torch.no_grad():
                log_p = lens_log_probs(lens, h[chosen], layer)
            terms = influence_terms(lens, layer, h[chosen], leaf.T, chunk_replacement, log_p)  # [k, chunk]
            part = (terms * weights[chunk]).sum()
            grad += torch.autograd.grad(part, leaf)[0]
            value += part.detach()
        return value + ((q - q.detach()) * grad).sum()

    return _stiefel_ascent(objective, frame.T, config.steps, config.lr, progress).T


def _stiefel_ascent(
    objective: Callable[[Tensor], Tensor],
    start: Tensor,
    steps: int,
    lr: float,
    on_step: Callable[[int], None] | None = None,
) -> Tensor:
    """Maximise objective(Q) over orthonormal-column Q [d, k] with Adam through a QR retraction, from ``start``."""
    weight = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.Adam([weight], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * i / max(1, steps))))
    for step in range(steps):
        loss = -objective(_orthonormal(weight))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # retract: keep the parameter itself orthonormal, so Adam's step size keeps its scale
            weight.copy_(_orthonormal(weight))
        if on_step is not None:
            on_step(step)
    return _orthonormal(weight.detach())


def _orthonormal(weight: Tensor) -> Tensor:
    """Q factor of weight [d, k] with signs fixed so that diag(R) > 0 (a smooth retraction)."""
    q, r = torch.linalg.qr(weight)
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
