"""Prediction trajectories: what every lens position predicts at every token, kept as statistics only.

For each lens position p (0 = embeddings, l = after l layers, L = the last layer's output, where every
lens is the model itself) and each token position t of a prompt, a `Trajectory` holds the top-k next
tokens with their probabilities, the entropy, the KL divergence from the model's final distribution,
the rank and probability of the token that actually comes next, and optionally the log-probability of
user-given target tokens minus that of anti-target tokens. All in nats.

Memory stays O(positions × tokens × (k + d_model)): the residuals are captured once, and log-probabilities
over the vocabulary exist only for one chunk of tokens at a time (the final distribution of that chunk
plus one lens position's), never as a [positions, tokens, vocab] tensor.

>>> from transformers import AutoModelForCausalLM, GPT2Config
>>> from lenslab.lenses import LogitLens
>>> config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2)
>>> model = AutoModelForCausalLM.from_config(config)
>>> trajectory = Trajectory.from_ids(model, LogitLens.from_model(model), [5, 6, 7], config=TrajectoryConfig(top_k=3))
>>> tuple(trajectory.top_k_ids.shape), trajectory.layers
((3, 3, 3), ['embeddings', 'layer 1', 'layer 2'])
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lenslab.adapter import ModelView
from lenslab.architectures import context_length
from lenslab.errors import LensLabError
from lenslab.lenses import Lens, layer_names, row_chunks
from lenslab.tokens import token_texts

logger = logging.getLogger(__name__)

EMPTY_PROMPT = "The prompt is empty; pass some text as the PROMPT argument or with --prompt-file."


@dataclass
class TrajectoryConfig:
    """What to compute for a trajectory."""

    top_k: int = 5
    """Number of most likely tokens kept per lens position and token."""
    positions: slice | None = None
    """Token positions of the prompt to compute (CLI ``--positions START:END``); None means all. Tokens after
    the end are not fed to the model, so a prompt longer than the model's context can still be shown."""
    targets: tuple[int, ...] = ()
    """Token ids whose summed probability is tracked as ``target_logprob`` (CLI ``--target``)."""
    anti_targets: tuple[int, ...] = ()
    """Token ids whose summed probability is subtracted in log space in ``target_score`` (CLI ``--anti-target``)."""
    chunk_elements: int = 2**22
    """Largest [tokens, vocab] block of log-probabilities alive at once (float32: 16 MiB by default)."""

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise LensLabError(f"top_k is {self.top_k} but at least 1 token must be kept; pass --top-k 1 or more.")
        if self.anti_targets and not self.targets:
            raise LensLabError("Anti-targets were given without targets; pass --target too (or drop --anti-target).")
        if self.positions is not None and self.positions.step not in (None, 1):
            raise LensLabError(
                f"positions has step {self.positions.step} but only contiguous ranges are shown; "
                "pass --positions START:END."
            )


STATISTIC_NAMES = ("entropy", "prob", "rank", "kl", "target")
"""Per-cell statistics of ``Trajectory.statistic`` (``--stat``); ``lenslab.plots.scales`` says how each is coloured."""


@dataclass
class Trajectory:
    """Statistics of one lens at every lens position × token position of a prompt.

    P = number of lens positions (L + 1, the last being the model's output), N = number of tokens shown,
    k = ``top_k``. Tensors live on the CPU; none has a vocabulary dimension.
    """

    model_name: str
    """Name or path of the model."""
    lens_name: str
    """Name of the lens: its kind, or the name it was given (`lenslab.specs.LensSpec.names`)."""
    lens_kind: str
    """Kind of lens (`Lens.kind`): "logit", "tuned", "jacobian", ..."""
    layers: list[str]
    """Lens position names (``lenslab.lenses.layer_names``): "embeddings", "layer 1", ..., "layer L"."""
    input_ids: Tensor
    """[N] int64, the prompt tokens shown (the prompt's tokens ``start:start + N``)."""
    next_ids: Tensor
    """[N] int64, the token that follows each shown token in the prompt; -1 after the prompt's last token."""
    top_k_ids: Tensor
    """[P, N, k] int64, most likely next tokens, most likely first."""
    top_k_probs: Tensor
    """[P, N, k] float32, their probabilities."""
    entropy: Tensor
    """[P, N] float32, entropy of the predicted distribution (nats)."""
    kl_to_final: Tensor
    """[P, N] float32, KL(final ‖ lens) = Σ p_final (log p_final − log p_lens) (nats); 0 at the output."""
    next_token_rank: Tensor
    """[P, N] int64, rank of the actual next token, 1 = most likely; -1 where there is no next token."""
    next_token_prob: Tensor
    """[P, N] float32, probability of the actual next token; NaN where there is no next token."""
    token_text: dict[int, str]
    """Decoded text of every token id referenced above (``lenslab.tokens.token_text``)."""
    start: int = 0
    """Index in the prompt of the first token shown."""
    target_ids: tuple[int, ...] = ()
    """Target token ids (see ``TrajectoryConfig.targets``)."""
    anti_target_ids: tuple[int, ...] = ()
    """Anti-target token ids."""
    target_logprob: Tensor | None = None
    """[P, N] float32, log of the summed probability of the targets; None without targets."""
    anti_target_logprob: Tensor | None = None
    """[P, N] float32, log of the summed probability of the anti-targets; None without anti-targets."""
    target_rank: Tensor | None = None
    """[P, N] int64, rank of the best-ranked target, 1 = most likely; None without targets."""

    @classmethod
    def from_ids(
        cls,
        model: PreTrainedModel | ModelView,
        lens: Lens,
        input_ids: Sequence[int] | Tensor,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        config: TrajectoryConfig | None = None,
    ) -> Trajectory:
        """The trajectory of ``lens`` over ``input_ids`` ([tokens] or [1, tokens]); the tokenizer names tokens."""
        return compute_trajectories(model, [lens], input_ids, tokenizer=tokenizer, config=config)[0]

    @classmethod
    def from_text(
        cls,
        model: PreTrainedModel | ModelView,
        tokenizer: PreTrainedTokenizerBase,
        lens: Lens,
        text: str,
        *,
        config: TrajectoryConfig | None = None,
    ) -> Trajectory:
        """The trajectory of ``lens`` over ``text`` as the tokenizer encodes it (special tokens included)."""
        return cls.from_ids(model, lens, encode_prompt(tokenizer, text), tokenizer=tokenizer, config=config)

    @property
    def num_positions(self) -> int:
        """P, the number of lens positions (rows)."""
        return self.top_k_ids.shape[0]

    @property
    def tokens(self) -> list[str]:
        """Text of each shown input token."""
        return [self.token_text[i] for i in self.input_ids.tolist()]

    @property
    def next_tokens(self) -> list[str | None]:
        """Text of the token that follows each shown token, None after the prompt's end."""
        return [self.token_text[i] if i >= 0 else None for i in self.next_ids.tolist()]

    @property
    def target_score(self) -> Tensor | None:
        """[P, N] log p(targets) − log p(anti-targets), or log p(targets) alone; None without targets."""
        if self.target_logprob is None:
            return None
        if self.anti_target_logprob is None:
            return self.target_logprob
        return self.target_logprob - self.anti_target_logprob

    def statistic(self, name: str) -> np.ndarray:
        """[P, N] float64 values of a statistic in ``STATISTIC_NAMES``; NaN where undefined."""
        if name not in STATISTIC_NAMES:
            raise LensLabError(f"Unknown statistic {name!r}; pass --stat one of {', '.join(STATISTIC_NAMES)}.")
        if name == "target" and self.target_logprob is None:
            raise LensLabError("The target statistic needs target tokens; pass --target TOKEN (and --anti-target).")
        values = {
            "entropy": lambda: self.entropy,
            "prob": lambda: self.next_token_prob,
            "rank": lambda: self.next_token_rank.double().masked_fill(self.next_token_rank < 0, math.nan),
            "kl": lambda: self.kl_to_final,
            "target": lambda: self.target_score,
        }[name]()
        return values.double().numpy()


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> Tensor:
    """[tokens] int64 ids of ``text`` with the tokenizer's usual special tokens; an empty prompt is an error."""
    ids = tokenizer(text)["input_ids"] if text else []
    if not text or not ids:
        raise LensLabError(EMPTY_PROMPT)
    return torch.tensor(ids, dtype=torch.long)


@torch.inference_mode()
def compute_trajectories(
    model: PreTrainedModel | ModelView,
    lenses: Sequence[Lens] | Mapping[str, Lens],
    input_ids: Sequence[int] | Tensor,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    config: TrajectoryConfig | None = None,
) -> list[Trajectory]:
    """Trajectories of several lenses over one prompt from one forward pass, each named by its key in `lenses`, or
    by its kind when `lenses` is a sequence.

    input_ids: [tokens] or [1, tokens]. Token chunks are the outer loop and lens positions the inner one,
    so only [chunk, vocab] log-probabilities (final and current) are alive at any time.
    """
    config = config or TrajectoryConfig()
    names = list(lenses) if isinstance(lenses, Mapping) else [lens.kind for lens in lenses]
    lenses = list(lenses.values()) if isinstance(lenses, Mapping) else list(lenses)
    ids = _check_ids(input_ids)
    _check_lenses(model.model if isinstance(model, ModelView) else model, lenses)
    view = lenses[0].view
    vocab = view.vocab_size
    for name, chosen in (("--target", config.targets), ("--anti-target", config.anti_targets)):
        if any(not 0 <= i < vocab for i in chosen):
            raise LensLabError(
                f"{name} ids {list(chosen)} are outside the vocabulary 0..{vocab - 1}; pass tokens of this model."
            )
    top_k = min(config.top_k, vocab)
    start, end = _token_range(view.model, len(ids), config.positions)

    residuals = view.capture(ids[None, :end].to(view.device), need_logits=False)
    hidden = [h[0, start:end] for h in residuals.hidden]  # each [N, d_model]
    next_ids = torch.cat([ids, ids.new_tensor([-1])])[start + 1 : end + 1]  # [N]
    n_tokens, n_positions = end - start, view.num_positions
    chunks = row_chunks(n_tokens, vocab, config.chunk_elements)
    logger.debug("trajectory: %d positions x %d tokens in %d chunks", n_positions, n_tokens, len(chunks))

    model_name = view.model.config.name_or_path or type(view.model).__name__
    results = [
        _empty(model_name, name, lens.kind, layer_names(view), ids[start:end].clone(), next_ids, start, top_k, config)
        for name, lens in zip(names, lenses)
    ]
    for columns in chunks:
        final = _Final.from_logits(view.decode(hidden[-1][columns]).float())
        chunk_next = next_ids[columns].to(final.probs.device)
        for lens, trajectory in zip(lenses, results):
            for position in range(n_positions):
                logits = lens(hidden[position][columns], position).float()  # [c, vocab]
                _fill(trajectory, (position, columns), logits, final, chunk_next)
                del logits  # before the next position's logits exist

    referenced = {*ids[start:end].tolist(), *next_ids[next_ids >= 0].tolist(), *config.targets, *config.anti_targets}
    for trajectory in results:
        referenced.update(trajectory.top_k_ids.unique().tolist())
    texts = token_texts(tokenizer, referenced)
    for trajectory in results:
        trajectory.token_text = texts
    return results


class _Final(NamedTuple):
    """The model's own distribution over one chunk of tokens, as KL(final ‖ lens) needs it."""

    probs: Tensor
    """[c, vocab] float32 probabilities."""
    neg_entropy: Tensor
    """[c] Σ p log p."""

    @classmethod
    def from_logits(cls, logits: Tensor) -> _Final:
        logprobs = torch.log_softmax(logits, dim=-1)
        probs = logprobs.exp()
        return cls(probs, torch.linalg.vecdot(probs, logprobs))


def _empty(model_name, lens_name, lens_kind, layers, input_ids, next_ids, start, top_k, config) -> Trajectory:
    """A Trajectory of zeros for ``_fill`` to complete; ``token_text`` is set once all top-k ids are known."""
    n_positions, n_tokens = len(layers), len(input_ids)

    def grid(dtype: torch.dtype = torch.float32, *extra: int) -> Tensor:
        return torch.zeros(n_positions, n_tokens, *extra, dtype=dtype)

    return Trajectory(
        model_name=model_name,
        lens_name=lens_name,
        lens_kind=lens_kind,
        layers=layers,
        input_ids=input_ids,
        next_ids=next_ids.clone(),
        top_k_ids=grid(torch.long, top_k),
        top_k_probs=grid(torch.float32, top_k),
        entropy=grid(),
        kl_to_final=grid(),
        next_token_rank=grid(torch.long),
        next_token_prob=grid(),
        token_text={},
        start=start,
        target_ids=tuple(config.targets),
        anti_target_ids=tuple(config.anti_targets),
        target_logprob=grid() if config.targets else None,
        anti_target_logprob=grid() if config.anti_targets else None,
        target_rank=grid(torch.long) if config.targets else None,
    )


def _fill(trajectory: Trajectory, cell: tuple[int, slice], logits: Tensor, final: _Final, next_ids: Tensor) -> None:
    """Store the statistics of one chunk of tokens at one lens position, ``cell = (position, columns)``.

    logits: [c, vocab] float32; next_ids: [c], -1 where there is no next token.
    """
    logprobs = torch.log_softmax(logits, dim=-1)  # [c, vocab]
    # Dot products (vecdot) rather than a product then a sum: one [c, vocab] temporary fewer.
    trajectory.entropy[cell] = (-torch.linalg.vecdot(logprobs.exp(), logprobs)).clamp_min(0).cpu()
    trajectory.kl_to_final[cell] = (final.neg_entropy - torch.linalg.vecdot(final.probs, logprobs)).clamp_min(0).cpu()
    top = logprobs.topk(trajectory.top_k_ids.shape[-1], dim=-1)
    trajectory.top_k_ids[cell] = top.indices.cpu()
    trajectory.top_k_probs[cell] = top.values.exp().cpu()
    has_next = next_ids >= 0
    next_logprob = logprobs.gather(-1, next_ids.clamp_min(0)[:, None])  # [c, 1]
    trajectory.next_token_rank[cell] = _rank(logprobs, next_logprob).masked_fill(~has_next, -1).cpu()
    trajectory.next_token_prob[cell] = next_logprob[:, 0].exp().masked_fill(~has_next, math.nan).cpu()
    if trajectory.target_ids:
        target_logprobs = logprobs[:, list(trajectory.target_ids)]  # [c, n_targets]
        trajectory.target_logprob[cell] = target_logprobs.logsumexp(-1).cpu()
        trajectory.target_rank[cell] = _rank(logprobs, target_logprobs.max(-1, keepdim=True).values).cpu()
    if trajectory.anti_target_ids:
        trajectory.anti_target_logprob[cell] = logprobs[:, list(trajectory.anti_target_ids)].logsumexp(-1).cpu()


def _rank(logprobs: Tensor, chosen: Tensor) -> Tensor:
    """[c] 1-based rank of ``chosen`` ([c, 1] log-probs) among ``logprobs`` ([c, vocab]); ties share the best rank."""
    # Summing booleans as int32: the default int64 sum first copies [c, vocab] to int64, twice as slow.
    return (logprobs > chosen).sum(-1, dtype=torch.int32).long() + 1


def _check_ids(input_ids: Sequence[int] | Tensor) -> Tensor:
    """[tokens] int64 on the CPU from [tokens] or [1, tokens]."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise LensLabError(
            f"input_ids has shape {list(ids.shape)} but one prompt, [tokens] or [1, tokens], was expected; "
            "pass one prompt at a time."
        )
    if ids.numel() == 0:
        raise LensLabError(EMPTY_PROMPT)
    return ids


def _check_lenses(model: PreTrainedModel, lenses: Sequence[Lens]) -> None:
    """Every lens must decode with this very model (a lens keeps its own ModelView)."""
    if not lenses:
        raise LensLabError("No lens was given; pass at least one lens (e.g. LogitLens.from_model(model)).")
    for lens in lenses:
        if lens.view.model is not model:
            raise LensLabError(
                f"The {lens.kind} lens was built for another model ({lens.view.model.config.name_or_path or '?'}) "
                f"than the one given ({model.config.name_or_path or '?'}); build or load the lens with this model."
            )


def _token_range(model: PreTrainedModel, n_tokens: int, positions: slice | None) -> tuple[int, int]:
    """[start, end) of the tokens to show, checked against the prompt and the model's context."""
    start, end, _ = (positions or slice(None)).indices(n_tokens)
    if positions is not None and end <= start:
        raise LensLabError(
            f"--positions {positions.start}:{positions.stop} selects no tokens of the {n_tokens}-token prompt; "
            f"pass START:END with 0 <= START < END <= {n_tokens}."
        )
    limit = context_length(model)
    if limit is not None and end > limit:
        raise LensLabError(
            f"The prompt has {n_tokens} tokens but {model.config.name_or_path or type(model).__name__} reads at most "
            f"{limit}; shorten the prompt or pass --positions START:END with END <= {limit}."
        )
    return start, end
