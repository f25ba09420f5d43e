"""Prediction depth: the layer at which a lens's top-1 guess settles on the model's final answer.

Baldock et al. (2021) measure example difficulty by the earliest layer from which a probe's prediction
equals the network's and stays equal; the tuned lens paper (Belrose et al. 2023) does the same per token with
the tuned lens and finds it correlated with the token's loss and with when in training the token was learned.

For a token position t, the lens at position l predicts ``top1[l, t]``; the final prediction is ``top1[L, t]``
(the lens at the last position is the model's own head). The depth is the least ``l`` with
``top1[l', t] == top1[L, t]`` for every ``l' >= l``: 0 when even the embeddings agree, L when only the model
does. With a model's training checkpoints, the learning checkpoint of a token is likewise the first checkpoint
from which its top-1 prediction is the true next token at that and every later checkpoint.

>>> settled_from(torch.tensor([[True, False], [False, True], [True, True]]))
tensor([2, 1])
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import Tensor
from transformers import PreTrainedModel

from lenslab.adapter import ModelView
from lenslab.errors import LensLabError
from lenslab.lenses import Lens, LogitLens, row_chunks

logger = logging.getLogger(__name__)


class DepthSummary(NamedTuple):
    """Per-depth aggregates, each a list indexed by depth 0..L."""

    counts: list[int]
    """Tokens at each depth."""
    mean_loss: list[float]
    """Mean model loss (nats) of the tokens at each depth; NaN where there are none."""
    mean_learned: list[float] | None
    """Mean learning checkpoint of the learned tokens at each depth; None without checkpoints."""


@dataclass
class DepthResult:
    """Prediction depth and loss of every predicted token; ``to_json()`` is the ``lenslab depth`` report."""

    depths: Tensor
    """[n_chunks, seq_len - 1] int64 prediction depth (0..L) of the prediction made at each position but the last."""
    losses: Tensor
    """[n_chunks, seq_len - 1] float32 the model's cross-entropy (nats) on the next token at each position."""
    num_layers: int
    """L: depths run from 0 to L."""
    spearman_depth_loss: float
    """Spearman rank correlation of depth with loss over all tokens (NaN when either is constant)."""
    learned: Tensor | None = None
    """[n_chunks, seq_len - 1] int64 index of the checkpoint from which each token is learned; -1 if never."""
    checkpoints: list[str] | None = None
    """Names of the checkpoints, in training order."""
    spearman_depth_learned: float | None = None
    """Spearman correlation of depth with the learning checkpoint, over tokens that were learned."""

    def by_depth(self) -> DepthSummary:
        """Token count, mean loss and mean learning checkpoint at each depth 0..L (NaN where a depth has no token)."""
        depths = self.depths.flatten()
        counts = torch.bincount(depths, minlength=self.num_layers + 1)

        def mean(values: Tensor, keep: Tensor) -> list[float]:
            sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, depths[keep], values[keep].double())
            return (sums / torch.bincount(depths[keep], minlength=len(counts))).tolist()  # 0 / 0 = NaN

        everything = torch.ones_like(depths, dtype=torch.bool)
        learned = None if self.learned is None else self.learned.flatten()
        return DepthSummary(
            counts=counts.tolist(),
            mean_loss=mean(self.losses.flatten(), everything),
            mean_learned=None if learned is None else mean(learned, learned >= 0),
        )

    def to_json(self) -> dict:
        """Per-token lists (chunk after chunk), the histogram and the correlations; NaN is written as None."""
        report = {
            "num_layers": self.num_layers,
            "shape": list(self.depths.shape),
            "depths": self.depths.flatten().tolist(),
            "losses": self.losses.flatten().tolist(),
            "histogram": self.by_depth().counts,
            "mean_depth": float(self.depths.float().mean()),
            "spearman_depth_loss": _finite_or_none(self.spearman_depth_loss),
        }
        if self.learned is not None:
            report["checkpoints"] = self.checkpoints
            report["learned"] = [None if index < 0 else index for index in self.learned.flatten().tolist()]
            report["spearman_depth_learned"] = _finite_or_none(self.spearman_depth_learned)
        return report


def settled_from(flags: Tensor) -> Tensor:
    """Least k with ``flags[k:]`` all True, along dim 0; ``len(flags)`` where ``flags[-1]`` is False.

    flags: [K, ...] bool -> [...] int64.
    """
    # The trailing run of Trues is the running product from the end; its length counts back from K.
    trailing = flags.flip(0).long().cumprod(0).sum(0)
    return len(flags) - trailing


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation of two equal-shape tensors, flattened; NaN when either is constant."""
    x, y = x.flatten().double().numpy(), y.flatten().double().numpy()
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(spearmanr(x, y).statistic)


def prediction_depth(view: ModelView, lens: Lens, tokens: Tensor, *, batch_size: int = 8) -> DepthResult:
    """Prediction depth under ``lens`` and the model's loss for every token of ``tokens: [n_chunks, seq_len]``."""
    _check_tokens(tokens, view.vocab_size)
    depths, losses = [], []
    for batch in tokens.split(batch_size):
        batch = batch.to(view.device)
        with torch.inference_mode():
            hidden = view.capture(batch, need_logits=False).hidden
            # top1: [L + 1, batch, seq - 1], its last row the model's own prediction.
            top1, loss = _predictions(lens, hidden, batch, list(range(view.num_positions)))
            depths.append(settled_from(top1 == top1[-1]).cpu())
            losses.append(loss.cpu())
    depths, losses = torch.cat(depths), torch.cat(losses)
    result = DepthResult(depths, losses, view.num_layers, spearman(depths, losses))
    logger.info("Mean prediction depth %.2f of %d; Spearman with loss %.3f", result.depths.float().mean(),
                view.num_layers, result.spearman_depth_loss)  # fmt: skip
    return result


def learned_checkpoint(checkpoints: Iterable[PreTrainedModel], tokens: Tensor, *, batch_size: int = 8) -> Tensor:
    """Index of the first checkpoint from which each token's top-1 prediction is right and stays right.

    checkpoints: models in training order, consumed one at a time (pass a generator that loads each, so only one
    is in memory); tokens: [n_chunks, seq_len] -> [n_chunks, seq_len - 1] int64, -1 for tokens the last checkpoint
    gets wrong.
    """
    correct = []  # per checkpoint: [n_chunks, seq_len - 1] bool
    for index, model in enumerate(checkpoints):
        # Through a view, so the forward stops before the head and the logits are decoded a slice at a time.
        view = ModelView.from_model(model)
        _check_tokens(tokens, view.vocab_size, f"checkpoint {index + 1}")
        flags = []
        for batch in tokens.split(batch_size):
            batch = batch.to(view.device)
            with torch.inference_mode():
                hidden = view.capture(batch, positions=[view.num_layers], need_logits=False).hidden
                top1, _ = _predictions(LogitLens(view), hidden, batch, [view.num_layers])
            flags.append((top1[0] == batch[:, 1:]).cpu())
        correct.append(torch.cat(flags))
    if not correct:
        raise LensLabError("No checkpoints were given; pass --checkpoints with at least one model.")
    learned = settled_from(torch.stack(correct))
    return learned.masked_fill(learned == len(correct), -1)


def _predictions(lens: Lens, hidden: list[Tensor | None], batch: Tensor, positions: list[int]) -> tuple[Tensor, Tensor]:
    """Top-1 prediction of ``lens`` at each of ``positions``, and the model's loss on the next token.

    hidden: residuals [batch, seq, d_model] by lens position (at least ``positions`` and the last); batch: [batch,
    seq] -> top1 [len(positions), batch, seq - 1] int64 and loss [batch, seq - 1] float32 nats. The logits exist one
    slice of tokens at a time (`row_chunks`), never as a [batch, seq, vocab] tensor.
    """
    view = lens.view
    last = view.num_layers
    flat = {position: hidden[position].flatten(0, 1) for position in {*positions, last}}  # [batch * seq, d_model]
    # Position t predicts token t + 1; the last position, whose target wraps around, is dropped at the end.
    targets = batch.roll(-1, 1).flatten()
    top1 = torch.empty(len(positions), len(targets), dtype=torch.long, device=batch.device)
    loss = torch.empty(len(targets), device=batch.device)
    for rows in row_chunks(len(targets), view.vocab_size):
        final = view.decode(flat[last][rows]).float()  # the model's own logits (every lens's at the last position)
        loss[rows] = F.cross_entropy(final, targets[rows], reduction="none")
        for index, position in enumerate(positions):
            logits = final if position == last else lens(flat[position][rows], position)  # [chunk, vocab]
            top1[index, rows] = logits.argmax(-1)
    return top1.view(len(positions), *batch.shape)[..., :-1], loss.view(batch.shape)[:, :-1]


def add_learning_order(result: DepthResult, learned: Tensor, names: list[str]) -> DepthResult:
    """``result`` with the learning checkpoints of its tokens and their Spearman correlation with depth."""
    if learned.shape != result.depths.shape:
        raise LensLabError(
            f"Learning checkpoints cover {list(learned.shape)} tokens but depths {list(result.depths.shape)}; "
            "compute both on the same --data tokens."
        )
    was_learned = learned >= 0
    result.learned, result.checkpoints = learned, names
    result.spearman_depth_learned = spearman(result.depths[was_learned], learned[was_learned])
    logger.info("%d of %d tokens learned; Spearman of depth with learning checkpoint %.3f",
                int(was_learned.sum()), learned.numel(), result.spearman_depth_learned)  # fmt: skip
    return result


def _check_tokens(tokens: Tensor, vocab_size: int, what: str = "the model") -> None:
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise LensLabError(
            f"Got token chunks of shape {list(tokens.shape)} where [n_chunks >= 1, seq_len >= 2] was expected; pass "
            "more --data tokens or a longer --seq-len."
        )
    if int(tokens.max()) >= vocab_size:
        raise LensLabError(
            f"Token id {int(tokens.max())} is outside the vocabulary of {what} ({vocab_size} tokens); pass models "
            "that share the tokenizer of --model."
        )


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value
