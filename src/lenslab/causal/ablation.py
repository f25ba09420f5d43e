"""Ablating directions of the residual stream, in a lens and in the model, with one rule for both.

Ablating a set of orthonormal directions V replaces the component of a residual h inside span(V) by that
of a *replacement* r and keeps the rest:

    ablate(h, V, r) = h + ((r - h) V^T) V          h, r: [..., d_model], V: [m, d_model]

The ablation kind only decides r:

- ``"mean"``: the mean residual of the sample (so the component along V becomes its average over the data);
- ``"zero"``: r = 0 (the component is removed, i.e. h is projected onto the complement of V);
- ``"resample"``: the residual at the same token position of another sequence of the sample, paired by a
  fixed derangement of the sequences (no sequence is paired with itself).

An `Ablation` holds that choice for one lens position of one sample; the lens (``replacement``) and the
model hook (``model_replacement``) take r from it, so both ablate with the *same* mean or the same partner.

``residual_edit`` is the one place that edits the model's residual stream during a forward; ``final_residuals``
runs the forward the model analyses read, stopping before the head so that no [batch, seq, vocab] logits exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from lenslab.errors import LensLabError
from lenslab.residuals import hook_residual

if TYPE_CHECKING:
    from lenslab.adapter import ModelView

AblationKind = Literal["mean", "zero", "resample"]
ABLATIONS: tuple[str, ...] = ("mean", "zero", "resample")
"""The ablation kinds, default first."""


@dataclass
class Ablation:
    """What replaces an ablated component at one lens position, fixed for one sample of sequences."""

    kind: AblationKind
    """``"mean"``, ``"zero"`` or ``"resample"`` (see the module docstring)."""
    mean: Tensor
    """[d_model] float32 mean of the sample's residuals at this position (kept for every kind, for the record)."""
    partner: Tensor | None = None
    """[n_seq] int64: for ``"resample"``, sequence i takes its replacement from sequence ``partner[i]``."""

    @classmethod
    def from_sample(cls, kind: str, h: Tensor, *, seed: int = 0) -> Ablation:
        """The ablation of ``kind`` for residuals ``h: [n_seq, seq, d_model]`` of one lens position."""
        if kind not in ABLATIONS:
            raise LensLabError(f"Unknown ablation {kind!r}; pass --ablation one of {', '.join(ABLATIONS)}.")
        if h.ndim != 3:
            raise LensLabError(f"Expected residuals of shape [n_seq, seq, d_model], got {list(h.shape)}.")
        partner = None
        if kind == "resample":
            if h.shape[0] < 2:
                raise LensLabError(
                    f"Resample ablation needs at least 2 sequences to pair, found {h.shape[0]}; raise --tokens "
                    f"or lower --seq-len."
                )
            partner = derangement(h.shape[0], torch.Generator().manual_seed(seed))
        mean = h.detach().flatten(0, 1).float().mean(0)
        return cls(kind=kind, mean=mean, partner=partner)  # type: ignore[arg-type]

    def replacement(self, h: Tensor) -> Tensor:
        """r for the whole sample, ``h: [n_seq, seq, d_model]`` -> broadcastable to h (float32)."""
        if self.kind == "mean":
            return self.mean.to(h.device)
        if self.kind == "zero":
            return torch.zeros_like(self.mean, device=h.device)
        return h[self.partner.to(h.device)].float()

    def model_replacement(self, sample: Tensor, sequences: Tensor) -> Tensor:
        """r for the rows ``sequences: [batch]`` of a model forward over the sample.

        sample: [n_seq, seq, d_model] the clean residuals at this position (only read for ``"resample"``:
        ablating at a position does not change the residuals *at* that position, so the partner's clean
        residual is exactly what the model would see there).
        """
        if self.kind == "resample":
            return sample[self.partner[sequences].to(sample.device)].float()
        return self.replacement(sample)


def derangement(n: int, generator: torch.Generator) -> Tensor:
    """A uniformly random permutation of range(n) without fixed points, [n] int64 (n >= 2).

    Rejection sampling: about e draws are needed on average.
    """
    while True:
        permutation = torch.randperm(n, generator=generator)
        if not (permutation == torch.arange(n)).any():
            return permutation


def ablate(h: Tensor, directions: Tensor, replacement: Tensor) -> Tensor:
    """Replace the component of h in span(directions) by that of ``replacement``.

    h: [..., d_model]; directions: [m, d_model] orthonormal rows; replacement broadcastable to h.
    Returns [..., d_model] in the directions' dtype (float32), so gradients reach the directions exactly.
    """
    h = h.to(directions.dtype)
    coefficients = (replacement - h) @ directions.T  # [..., m]
    return h + coefficients @ directions


def ablate_each(h: Tensor, directions: Tensor, replacement: Tensor) -> Tensor:
    """One copy of h per direction, each with that single direction ablated.

    h: [n, d_model]; directions: [k, d_model]; replacement: [d_model] or [n, d_model] -> [k, n, d_model].
    """
    h = h.to(directions.dtype)
    coefficients = (replacement - h) @ directions.T  # [n, k]
    return h.unsqueeze(0) + coefficients.T.unsqueeze(-1) * directions.unsqueeze(1)


@contextmanager
def residual_edit(view: ModelView, position: int, edit: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """While active, every forward of ``view.model`` replaces the residual h at lens ``position`` by edit(h).

    Positions are those of `lenslab.residuals` (the hook is `hook_residual`). ``edit`` maps [batch, seq, d_model]
    to the same shape; its result is cast to the residual's dtype. The hook is removed on exit, even on errors.
    """
    if not 0 <= position < view.num_positions:
        raise LensLabError(
            f"Layer {position} is out of range for a model with lens positions 0..{view.num_positions - 1}; "
            f"pass --layers within that range."
        )

    def edited(h: Tensor) -> Tensor:
        return edit(h).to(h.dtype)

    handle = hook_residual(view, position, edited)
    try:
        yield
    finally:
        handle.remove()


def final_residuals(view: ModelView, input_ids: Tensor) -> Tensor:
    """The last residual of a forward over ``input_ids: [batch, seq]`` (under any `residual_edit`), [batch * seq,
    d_model]: ``view.decode`` of a slice of its rows gives the model's logits there (the adapter checked that)."""
    last = view.num_layers
    return view.capture(input_ids, positions=[last], need_logits=False).hidden[last].flatten(0, 1)
