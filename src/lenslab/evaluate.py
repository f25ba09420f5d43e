"""Per-layer evaluation of lenses: how well each lens position predicts the next token and the model.

For every lens and lens position (0 = the embeddings, l = the output of layer l - 1, L = the last layer's
output, where every lens is the model itself) over held-out tokens:

- ``ce``: cross-entropy of the lens's prediction against the next token, and its ``perplexity``;
- ``kl``: KL(p_final ‖ p_lens), how far the lens is from the model's own prediction at that token;
- ``entropy`` of the lens's prediction, and ``top1_agreement`` of its argmax with the model's;
- ``bias_kl``: KL between the model's and the lens's *marginal* token distributions (the mean of the
  probabilities over all scored tokens), the systematic bias the tuned lens paper measures (its section 3).

All values are in nats per token; ``EvalResult.nats_to_bits_per_byte`` converts them to bits per byte.
The computation streams: one forward per batch captures the residuals (``[batch, seq, d_model]`` each), and
logits are decoded one lens position and one slice of rows at a time into running sums, so no
``[layers, tokens, vocab]`` tensor ever exists. Log-softmax is taken in float32 whatever the model's dtype.

``transfer_matrix`` applies translator i of a lens at residual position j for every pair, which shows how
much the per-layer translators differ (the tuned lens paper's transfer-penalty figure).

>>> result = evaluate_lenses(view, {"logit": LogitLens(view), "tuned": lens}, tokens)  # doctest: +SKIP
>>> result.lenses["tuned"].kl[:2], result.to_json()["final"]                            # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lenslab.adapter import ModelView
from lenslab.errors import LensLabError
from lenslab.lenses import Lens, layer_names, row_chunks

log = logging.getLogger(__name__)

# Logit elements decoded at once (rows = this // vocab): 64M float32 values are 256 MiB per [rows, vocab]
# tensor, and a step holds about six of them, which fits beside a large model on one accelerator.
_ELEMENTS_PER_STEP = 2**26


@dataclass
class LensMetrics:
    """One lens's metrics per lens position, each a list of length L + 1, in nats where a unit applies."""

    ce: list[float]
    """Mean cross-entropy of the lens's prediction against the next token."""
    perplexity: list[float]
    """exp(ce)."""
    kl: list[float]
    """Mean KL(p_final ‖ p_lens) over the scored tokens."""
    entropy: list[float]
    """Mean entropy of the lens's prediction."""
    top1_agreement: list[float]
    """Fraction of tokens where the lens's most likely token is the model's."""
    bias_kl: list[float]
    """KL(mean p_final ‖ mean p_lens): the divergence of the marginal token distributions over the scored tokens."""


@dataclass
class TransferMatrix:
    """Translator i of a lens applied to the residual at position j, for every (i, j); lists of L + 1 rows.

    Row L is the identity (the logit lens at each position); the diagonal is the lens's own per-position score.
    """

    kl: list[list[float]]
    """[translator][position] mean KL(p_final ‖ p) in nats."""
    ce: list[list[float]]
    """[translator][position] mean cross-entropy against the next token in nats."""


@dataclass
class EvalResult:
    """Per-layer metrics of several lenses on the same tokens; ``to_json()`` gives the file layout."""

    model: str
    """Name or path of the evaluated model."""
    tokens: int
    """Number of scored predictions (every position of every sequence but the last)."""
    nats_to_bits_per_byte: float | None
    """Multiply a value in nats per token by this to get bits per byte; None when the text's bytes are unknown."""
    layers: list[str]
    """Names of the lens positions (see ``layer_names``)."""
    final_ce: float
    """The model's own mean cross-entropy against the next token."""
    final_entropy: float
    """Mean entropy of the model's own prediction."""
    lenses: dict[str, LensMetrics]
    """Metrics of each lens, by name."""
    transfer: dict[str, TransferMatrix] = field(default_factory=dict)
    """Transfer matrices of the lenses that have one, by name."""
    kinds: dict[str, str] = field(default_factory=dict)
    """Each lens's kind (``Lens.kind``: "logit", "tuned", "jacobian"...), by name; figures colour lenses by it."""

    def unit_factor(self, units: str) -> float:
        """Multiplier from nats per token to ``units``: ``"nats"`` (1) or ``"bits-per-byte"``."""
        if units == "nats":
            return 1.0
        if units != "bits-per-byte":
            raise LensLabError(f"Unknown units {units!r}; pass --units bits-per-byte or nats.")
        if self.nats_to_bits_per_byte is None:
            raise LensLabError(
                "Bits per byte need the bytes per token of the evaluated text, which this result lacks; pass "
                "--units nats (or bits_per_byte_factor= to evaluate_lenses)."
            )
        return self.nats_to_bits_per_byte

    def to_json(self) -> dict:
        """The JSON layout: model, tokens, factor, layers, ``final: {ce, entropy}``, ``lenses``, ``kinds``,
        ``transfer``."""
        data = {
            "model": self.model,
            "tokens": self.tokens,
            "nats_to_bits_per_byte": self.nats_to_bits_per_byte,
            "layers": self.layers,
            "final": {"ce": self.final_ce, "entropy": self.final_entropy},
            "lenses": {name: dataclasses.asdict(metrics) for name, metrics in self.lenses.items()},
            "kinds": self.kinds,
        }
        if self.transfer:
            data["transfer"] = {name: dataclasses.asdict(matrix) for name, matrix in self.transfer.items()}
        return data


class _Cell(NamedTuple):
    """One thing to score: ``lens(residual at position, translator)``."""

    lens: Lens
    translator: int
    position: int


class _Totals(NamedTuple):
    """Running sums over the scored tokens; row k is cell k, the last row the model itself."""

    stats: Tensor
    """[cells + 1, 4] float64 sums of cross-entropy, KL, entropy and top-1 agreements."""
    log_marginal: Tensor | None
    """[cells + 1, vocab] float64 log of the summed probabilities, or None when not asked for."""
    count: int
    """Number of scored tokens."""


def evaluate_lenses(
    view: ModelView,
    lenses: dict[str, Lens],
    tokens: Tensor,
    *,
    batch_size: int = 8,
    bits_per_byte_factor: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Score every lens at every lens position on ``tokens: [n_sequences, seq_len]``.

    Every position but the last of each sequence is scored against the next token and the model's own
    prediction. ``bits_per_byte_factor`` (``TokenData.nats_to_bits_per_byte``) is recorded for unit
    conversion; ``progress``, when given, is called with the number of sequences after each batch.
    """
    if not lenses:
        raise LensLabError("No lens to evaluate; pass at least one lens, e.g. {'logit': LogitLens(view)}.")
    for name, lens in lenses.items():
        _check_lens(view, name, lens)
    positions = range(view.num_positions)
    cells = [_Cell(lens, position, position) for lens in lenses.values() for position in positions]
    totals = _accumulate(view, cells, tokens, batch_size=batch_size, marginals=True, progress=progress)
    means = totals.stats / totals.count  # [cells + 1, 4]
    log_means = totals.log_marginal - math.log(totals.count)  # [cells + 1, vocab]
    bias = [_kl_of_logs(log_means[-1], log_means[k]) for k in range(len(cells))]
    metrics = {}
    for index, name in enumerate(lenses):
        rows = slice(index * len(positions), (index + 1) * len(positions))
        ce, kl, entropy, agreement = means[rows].T.tolist()
        metrics[name] = LensMetrics(
            ce=ce,
            perplexity=[math.exp(value) for value in ce],
            kl=kl,
            entropy=entropy,
            top1_agreement=agreement,
            bias_kl=bias[rows],
        )
    final_ce, _, final_entropy, _ = means[-1].tolist()
    return EvalResult(
        model=_model_name(view),
        tokens=totals.count,
        nats_to_bits_per_byte=bits_per_byte_factor,
        layers=layer_names(view),
        final_ce=final_ce,
        final_entropy=final_entropy,
        lenses=metrics,
        kinds={name: lens.kind for name, lens in lenses.items()},
    )


def transfer_matrix(
    view: ModelView,
    lens: Lens,
    tokens: Tensor,
    *,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> TransferMatrix:
    """KL and cross-entropy of ``lens(residual at position j, translator i)`` for every i, j in 0..L.

    tokens: [n_sequences, seq_len]. Costs (L + 1)^2 decodes per batch against L + 1 for ``evaluate_lenses``.
    """
    _check_lens(view, "lens", lens)
    positions = range(view.num_positions)
    cells = [_Cell(lens, translator, position) for translator in positions for position in positions]
    totals = _accumulate(view, cells, tokens, batch_size=batch_size, marginals=False, progress=progress)
    means = (totals.stats[:-1] / totals.count).view(len(positions), len(positions), 4)  # [translator, position, 4]
    return TransferMatrix(kl=means[..., 1].tolist(), ce=means[..., 0].tolist())


def _check_lens(view: ModelView, name: str, lens: Lens) -> None:
    """Refuse a lens built on another model than ``view``'s."""
    if lens.view.model is not view.model or len(lens) != view.num_positions:
        raise LensLabError(
            f"Lens {name!r} was built for {_model_name(lens.view)} with {len(lens)} positions, not for the "
            f"evaluated {_model_name(view)} with {view.num_positions}; pass lenses made from the same ModelView."
        )


def _model_name(view: ModelView) -> str:
    return view.model.config.name_or_path or type(view.model).__name__


def _kl_of_logs(log_p: Tensor, log_q: Tensor) -> float:
    """KL(p ‖ q) in nats from log-probabilities over the last dimension, summed over everything."""
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()


def _scores(log_probs: Tensor, targets: Tensor, final_log_probs: Tensor, final_top: Tensor) -> Tensor:
    """[4] sums over rows of cross-entropy, KL(final ‖ lens), entropy and top-1 agreements.

    log_probs, final_log_probs: [rows, vocab] float32; targets, final_top: [rows].
    """
    ce = -log_probs.gather(-1, targets[:, None]).sum()
    kl = F.kl_div(log_probs, final_log_probs, log_target=True, reduction="sum")
    entropy = -(log_probs.exp() * log_probs).sum()
    agreement = (log_probs.argmax(-1) == final_top).sum()
    return torch.stack([ce, kl, entropy, agreement.float()]).double()


@torch.no_grad()
def _accumulate(
    view: ModelView,
    cells: list[_Cell],
    tokens: Tensor,
    *,
    batch_size: int,
    marginals: bool,
    progress: Callable[[int], None] | None,
) -> _Totals:
    """Stream ``tokens`` through the model once and sum every cell's scores (and log-marginals) over tokens."""
    _check_tokens(tokens, batch_size)
    last = view.num_layers
    device = view.device
    stats = torch.zeros(len(cells) + 1, 4, dtype=torch.float64, device=device)
    log_marginal = (
        torch.full((len(cells) + 1, view.vocab_size), -math.inf, dtype=torch.float64, device=device)
        if marginals
        else None
    )
    # The model's own prediction is decoded from the last residual, slice by slice like the lenses, so the
    # forward can stop before the head and no [batch, seq, vocab] tensor exists (the adapter has checked that
    # this decode reproduces the model's logits).
    positions = sorted({cell.position for cell in cells} | {last})
    count = 0
    for batch in tokens.split(batch_size):
        batch = batch.to(device)
        residuals = view.capture(batch, positions=positions, need_logits=False)
        # Position t predicts token t + 1, so the last position of each sequence has nothing to score.
        hidden = {p: residuals.hidden[p][:, :-1].reshape(-1, view.d_model) for p in positions}  # [rows, d_model]
        targets = batch[:, 1:].reshape(-1)  # [rows]
        for rows in row_chunks(len(targets), view.vocab_size, _ELEMENTS_PER_STEP):
            final_log_probs = view.decode(hidden[last][rows]).float().log_softmax(-1)  # [chunk, vocab]
            final_top = final_log_probs.argmax(-1)
            for k, cell in enumerate([*cells, None]):
                if cell is None or cell.translator == cell.position == last:
                    # At the last position every lens is the model itself: its own prediction is scored, so KL
                    # is 0 and agreement 1 exactly, not up to rounding.
                    log_probs = final_log_probs
                else:
                    log_probs = cell.lens(hidden[cell.position][rows], cell.translator).float().log_softmax(-1)
                stats[k] += _scores(log_probs, targets[rows], final_log_probs, final_top)
                if log_marginal is not None:
                    # Summed in log space, so a probability that underflows float32 still counts.
                    log_marginal[k] = torch.logaddexp(log_marginal[k], log_probs.logsumexp(0).double())
        count += len(targets)
        if progress is not None:
            progress(len(batch))
        log.debug("Scored %d tokens", count)
    return _Totals(stats=stats.cpu(), log_marginal=None if log_marginal is None else log_marginal.cpu(), count=count)


def _check_tokens(tokens: Tensor, batch_size: int) -> None:
    if batch_size < 1:
        raise LensLabError(f"Batch size {batch_size} is not positive; pass --batch-size 1 or more.")
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2 or tokens.is_floating_point():
        raise LensLabError(
            f"Got tokens of shape {list(tokens.shape)} and dtype {tokens.dtype} where integer token ids of shape "
            "[n_sequences >= 1, seq_len >= 2] were expected; pass more evaluation tokens (--tokens, --seq-len)."
        )
