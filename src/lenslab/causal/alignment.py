"""Stimulus–response alignment: does the lens predict how the model's output changes when a residual changes?

At lens position l, every sequence's residual is replaced by that of another sequence of the sample (at the same
token positions; sequences paired by a fixed derangement). The *stimulus* is the change the lens predicts,
log lens(h') − log lens(h); the *response* is the change of the model's final output when the same replacement
is made inside the model, log model(x; h_l <- h') − log model(x). Both are changes of a distribution over the
vocabulary, i.e. vectors of the simplex's Aitchison geometry, where differences of log-probabilities are
perturbations and only their centred log-ratio (clr) matters.

Their alignment is the cosine of the two changes under the Aitchison inner product weighted by the model's clean
output distribution w (Egozcue & Pawlowsky-Glahn's weighted simplex, as the tuned lens paper uses, so that tokens
the model considers impossible do not dominate):

    clr_w(a)_i = a_i − Σ_j w_j a_j,     ⟨a, b⟩_w = Σ_i w_i clr_w(a)_i clr_w(b)_i,
    similarity = ⟨s, r⟩_w / sqrt(⟨s, s⟩_w ⟨r, r⟩_w)  ∈ [-1, 1]

averaged over tokens. Tokens where either change is zero (identical residuals, e.g. the same first token in two
sequences) have no direction and are left out of the average.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lenslab.adapter import ModelView
from lenslab.causal.ablation import Ablation, final_residuals, residual_edit
from lenslab.causal.influence import lens_log_probs, token_chunks
from lenslab.errors import LensLabError
from lenslab.lenses import Lens

_ZERO_NORM = 1e-12  # squared weighted norm below which a change counts as none


@dataclass
class Alignment:
    """Stimulus–response alignment at one lens position."""

    layer: int
    """Lens position perturbed."""
    similarity: float
    """Mean weighted Aitchison cosine of stimulus and response, in [-1, 1]."""
    tokens: int
    """Tokens averaged over (those where both changes are non-zero)."""


def weighted_aitchison_similarity(stimulus: Tensor, response: Tensor, weights: Tensor) -> Tensor:
    """Cosine of two log-probability changes in the w-weighted Aitchison geometry.

    stimulus, response: [..., vocab] differences of log-probabilities; weights: [..., vocab] a probability
    distribution -> [...] in [-1, 1], NaN where either change has zero norm.
    """
    stimulus, response, weights = stimulus.double(), response.double(), weights.double()
    clr_s = stimulus - (weights * stimulus).sum(-1, keepdim=True)
    clr_r = response - (weights * response).sum(-1, keepdim=True)
    inner = (weights * clr_s * clr_r).sum(-1)
    norms = (weights * clr_s.square()).sum(-1) * (weights * clr_r.square()).sum(-1)
    cosine = inner / norms.clamp_min(_ZERO_NORM**2).sqrt()
    return cosine.clamp(-1.0, 1.0).where(norms > _ZERO_NORM**2, torch.nan)


@torch.no_grad()
def stimulus_response_alignment(
    view: ModelView,
    lens: Lens,
    input_ids: Tensor,
    residuals: Tensor,
    layer: int,
    *,
    seed: int = 0,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> Alignment:
    """Mean weighted Aitchison similarity of lens stimulus and model response at ``layer``.

    input_ids: [n_seq, seq]; residuals: [n_seq, seq, d_model] their clean residuals at ``layer``.
    ``seed`` fixes the pairing of sequences.
    """
    if residuals.shape[:2] != input_ids.shape:
        raise LensLabError(
            f"Residuals of shape {list(residuals.shape)} do not belong to input ids of shape {list(input_ids.shape)}; "
            "pass the residuals captured from these ids."
        )
    pairing = Ablation.from_sample("resample", residuals, seed=seed)
    total, count = 0.0, 0
    for start in range(0, len(input_ids), batch_size):
        sequences = torch.arange(start, min(start + batch_size, len(input_ids)))
        ids = input_ids[sequences].to(view.device)
        h = residuals[sequences].to(view.device)
        other = pairing.model_replacement(residuals, sequences).to(view.device, h.dtype)  # [batch, seq, d_model]
        clean = final_residuals(view, ids)  # [batch * seq, d_model], like the rest below
        with residual_edit(view, layer, lambda _: other):
            perturbed = final_residuals(view, ids)
        h_rows, other_rows = h.flatten(0, 1), other.flatten(0, 1)
        # A chunk of tokens at a time: the similarity holds several float64 [chunk, vocab] tensors.
        for rows in token_chunks(len(h_rows), 1, view.vocab_size):
            stimulus = lens_log_probs(lens, other_rows[rows], layer) - lens_log_probs(lens, h_rows[rows], layer)
            log_clean = view.decode(clean[rows]).float().log_softmax(-1)  # [chunk, vocab]
            response = view.decode(perturbed[rows]).float().log_softmax(-1) - log_clean
            similarity = weighted_aitchison_similarity(stimulus, response, log_clean.exp())
            defined = ~similarity.isnan()
            total += float(similarity[defined].sum())
            count += int(defined.sum())
        if progress is not None:
            progress(len(sequences))
    return Alignment(layer=layer, similarity=total / count if count else float("nan"), tokens=count)
