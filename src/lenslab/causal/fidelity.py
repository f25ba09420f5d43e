"""Causal fidelity: does ablating a direction matter to the model as much as it matters to the lens?

For each direction of a causal basis at lens position l, ablate it in the model itself (the residual at l edited
during the forward by `residual_edit`, with the basis's own `Ablation`, so the same mean or the same resample
partner as in the lens) and measure the expected KL between the model's clean and ablated final outputs:

    model influence(v) = E_tokens[ KL( model(x) ‖ model(x; h_l <- ablate(h_l, v)) ) ]     (nats)

The Spearman rank correlation between the lens influences and the model influences of the k directions says
whether the lens ranks directions the way the model does (the tuned lens paper reports ρ ≈ 0.89 for the tuned
lens).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from scipy.stats import spearmanr
from torch import Tensor

from lenslab.adapter import ModelView
from lenslab.causal.ablation import ablate, final_residuals, residual_edit
from lenslab.causal.basis import CausalBasis
from lenslab.causal.influence import kl_divergence, lens_influences, token_chunks
from lenslab.errors import LensLabError
from lenslab.lenses import Lens


@dataclass
class Fidelity:
    """Lens and model influence of every direction of one basis."""

    layer: int
    """Lens position of the basis."""
    lens_influence: list[float]
    """[k] nats, σ of each direction in the lens, in the basis's order."""
    model_influence: list[float]
    """[k] nats, KL of the model's final output when the direction is ablated in the model, same order."""
    spearman: float | None
    """Spearman rank correlation of the two lists; None when undefined (k < 2 or a constant list)."""


@torch.no_grad()
def model_influences(
    view: ModelView,
    input_ids: Tensor,
    residuals: Tensor,
    basis: CausalBasis,
    *,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Expected KL of the model's output when each basis direction is ablated in the model, [k] float32 nats.

    input_ids: [n_seq, seq] the sample; residuals: [n_seq, seq, d_model] its clean residuals at the basis's
    position (read only by resample ablation). ``progress(n)`` is called with the sequences done per batch.
    """
    if residuals.shape[:2] != input_ids.shape:
        raise LensLabError(
            f"Residuals of shape {list(residuals.shape)} do not belong to input ids of shape {list(input_ids.shape)}; "
            "pass the residuals captured from these ids."
        )
    directions = basis.directions.to(view.device, torch.float32)
    total = torch.zeros(len(directions), device=view.device)
    for start in range(0, len(input_ids), batch_size):
        sequences = torch.arange(start, min(start + batch_size, len(input_ids)))
        ids = input_ids[sequences].to(view.device)
        clean = final_residuals(view, ids)  # [batch * seq, d_model]
        replacement = basis.ablation.model_replacement(residuals, sequences).to(view.device)
        for j, direction in enumerate(directions):
            edit = lambda h, direction=direction: ablate(h, direction.unsqueeze(0), replacement)  # noqa: E731
            with residual_edit(view, basis.layer, edit):
                ablated = final_residuals(view, ids)
            # Decoded a chunk of tokens at a time; the clean chunk is decoded again for every direction, which
            # costs one head per direction but keeps memory bounded by a chunk, not by the batch or by k.
            for rows in token_chunks(len(clean), 1, view.vocab_size):
                log_p = view.decode(clean[rows]).float().log_softmax(-1)  # [chunk, vocab]
                total[j] += kl_divergence(log_p, view.decode(ablated[rows])).sum()
        if progress is not None:
            progress(len(sequences))
    return total / input_ids.numel()


def causal_fidelity(
    view: ModelView,
    lens: Lens,
    input_ids: Tensor,
    residuals: Tensor,
    basis: CausalBasis,
    *,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> Fidelity:
    """Lens and model influence of each direction of ``basis`` on this sample, and their rank correlation.

    Both influences are computed here on the same tokens (input_ids: [n_seq, seq], residuals:
    [n_seq, seq, d_model] at the basis's position), with the basis's own ablation.
    """
    h = residuals.flatten(0, 1)
    replacement = basis.ablation.replacement(residuals)
    replacement = replacement.flatten(0, 1) if replacement.ndim == 3 else replacement
    in_lens = lens_influences(lens, basis.layer, h, basis.directions, replacement).cpu()
    in_model = model_influences(view, input_ids, residuals, basis, batch_size=batch_size, progress=progress).cpu()
    return Fidelity(
        layer=basis.layer,
        lens_influence=in_lens.tolist(),
        model_influence=in_model.tolist(),
        spearman=rank_correlation(in_lens.tolist(), in_model.tolist()),
    )


def rank_correlation(a: list[float], b: list[float]) -> float | None:
    """scipy's Spearman ρ, or None where it is undefined (fewer than 2 values, or a constant list)."""
    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    rho = float(spearmanr(a, b).statistic)
    return None if math.isnan(rho) else rho
