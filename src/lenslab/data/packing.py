"""Token chunks for lenses: documents tokenized, joined by EOS, split into held-out and training parts, packed.

The held-out part is made of whole documents, before packing, so no text is shared with training. It is the first
documents of the source, which keeps it the same whatever the seed or the number of training tokens: a later
evaluation asking for at most as many held-out tokens sees only text that training never saw.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lenslab.architectures import context_length
from lenslab.data.sources import DataSpec, iter_texts
from lenslab.errors import LensLabError

log = logging.getLogger(__name__)

MAX_SEQ_LEN = 2048
"""Longest default chunk: the tuned lens paper's length, and enough context for every layer to settle."""
_TOKENIZE_BATCH = 64  # documents per tokenizer call: fast tokenizers encode a batch on all cores


@dataclass
class TokenData:
    """Packed token chunks for training and evaluating lenses."""

    train: torch.Tensor
    """[n_train_chunks, seq_len] int64 token ids, shuffled with the seed."""
    heldout: torch.Tensor
    """[n_heldout_chunks, seq_len] int64 token ids from documents that `train` never contains, in source order."""
    seq_len: int
    """Tokens per chunk, a leading BOS included."""
    bytes_per_token: float
    """UTF-8 bytes of the documents used divided by their token count (separators and BOS not counted)."""
    source: str
    """`DataSpec.describe()` of where the text came from."""
    train_documents: int = 0
    """Documents that went (whole or cut at the last chunk) into `train`."""
    heldout_documents: int = 0
    """Documents that went into `heldout`."""

    @property
    def nats_to_bits_per_byte(self) -> float:
        """Multiply a loss in nats per token by this to get bits per byte: 1 / (ln 2 * bytes_per_token)."""
        return 1.0 / (math.log(2) * self.bytes_per_token)

    def shard(self, rank: int, world_size: int) -> TokenData:
        """This process's share for distributed training: chunks `rank::world_size` of both splits.

        Both splits are first cut to a multiple of `world_size` chunks so that every process runs the same number
        of steps (an uneven count would leave the others waiting at a collective forever).
        """
        if not 0 <= rank < world_size:
            raise LensLabError(f"Shard rank {rank} is outside 0..{world_size - 1}; pass a rank below world_size.")

        def share(chunks: torch.Tensor, flag: str) -> torch.Tensor:
            usable = len(chunks) // world_size * world_size
            if len(chunks) and not usable:
                raise LensLabError(
                    f"{len(chunks)} chunks cannot be shared by {world_size} processes; raise {flag} to at least "
                    f"{world_size * self.seq_len} tokens."
                )
            return chunks[:usable][rank::world_size]

        return replace(self, train=share(self.train, "--train-tokens"), heldout=share(self.heldout, "--heldout-tokens"))


def default_seq_len(model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase | None) -> int:
    """`MAX_SEQ_LEN` or the model's context length (config or tokenizer, whichever is shorter), if shorter."""
    return min(MAX_SEQ_LEN, context_length(model, tokenizer) or MAX_SEQ_LEN)


@dataclass
class _Split:
    """Whole documents' token ids, each followed by the separator, gathered until `need` ids are held."""

    need: int
    pieces: list[np.ndarray] = field(default_factory=list)
    length: int = 0
    documents: int = 0
    text_bytes: int = 0
    text_tokens: int = 0

    @property
    def full(self) -> bool:
        return self.length >= self.need

    def add(self, ids: np.ndarray, text_bytes: int) -> None:
        """Add one document: ids: [n_tokens + 1], its tokens then the separator."""
        self.pieces.append(ids)
        self.length += len(ids)
        self.documents += 1
        self.text_bytes += text_bytes
        self.text_tokens += len(ids) - 1

    def chunks(self, prefix: list[int], seq_len: int) -> torch.Tensor:
        """[need / (seq_len - len(prefix)), seq_len] chunks: `prefix` then the next stretch of the stream."""
        body = seq_len - len(prefix)
        stream = torch.from_numpy(np.concatenate(self.pieces or [np.zeros(0, np.int64)])[: self.need])
        stream = stream.view(-1, body)  # [n_chunks, body]
        return torch.cat([torch.tensor(prefix, dtype=torch.int64).expand(len(stream), -1), stream], dim=1)


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before a text (Llama's BOS), found by encoding one with and without."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
    return full[: starts[0]] if starts else []


def heldout_span(tokenizer: PreTrainedTokenizerBase, *, heldout_tokens: int, seq_len: int) -> int:
    """Tokens at the start of the source's token stream that `prepare_tokens` holds out for `heldout_tokens` in chunks
    of `seq_len`: training reads only text after them, so an evaluation reading no more than them scores only text
    training never saw."""
    return _stream_tokens(heldout_tokens, seq_len, len(_special_prefix(tokenizer)))


def _stream_tokens(tokens: int, seq_len: int, prefix_length: int) -> int:
    """Stream tokens in ceil(tokens / seq_len) chunks, each `prefix_length` special tokens then the stream."""
    return math.ceil(tokens / seq_len) * (seq_len - prefix_length)


def prepare_tokens(
    spec: DataSpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    train_tokens: int,
    heldout_tokens: int,
    seq_len: int | None = None,
    seed: int = 0,
    model: PreTrainedModel | None = None,
) -> TokenData:
    """Read, tokenize and pack just enough of the source: ceil(tokens / seq_len) chunks per split.

    `seq_len` defaults to `default_seq_len(model, tokenizer)`; `model` is also needed for `DataSpec("self")`.
    Raises LensLabError, before any training, when the source runs out of documents.
    """
    if train_tokens < 0 or heldout_tokens < 0 or train_tokens + heldout_tokens == 0:
        raise LensLabError(
            f"Asked for {train_tokens} training and {heldout_tokens} held-out tokens; pass positive "
            f"--train-tokens or --heldout-tokens."
        )
    context = context_length(model, tokenizer)
    seq_len = default_seq_len(model, tokenizer) if seq_len is None else seq_len
    prefix = _special_prefix(tokenizer)
    if seq_len < len(prefix) + 2 or (context is not None and seq_len > context):
        limit = f" and at most the model's context length {context}" if context else ""
        raise LensLabError(f"--seq-len {seq_len} cannot be used; pass at least {len(prefix) + 2}{limit}.")
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if separator is None:
        raise LensLabError("The tokenizer has no EOS or BOS token to join documents with; pass a tokenizer that does.")

    body = seq_len - len(prefix)
    heldout = _Split(need=_stream_tokens(heldout_tokens, seq_len, len(prefix)))
    train = _Split(need=_stream_tokens(train_tokens, seq_len, len(prefix)))
    batch: list[tuple[str, int]] = []  # (text, UTF-8 bytes)

    def tokenize_batch() -> None:
        encoded = tokenizer([text for text, _ in batch], add_special_tokens=False, verbose=False)["input_ids"]
        for ids, (_, text_bytes) in zip(encoded, batch):
            # Held-out documents come first so that the held-out text does not depend on train_tokens.
            split = heldout if not heldout.full else train
            if not split.full:
                split.add(np.array([*ids, separator], dtype=np.int64), text_bytes)
        batch.clear()

    texts = iter_texts(spec, model=model, tokenizer=tokenizer, seed=seed)
    for text in texts:
        batch.append((text, len(text.encode("utf-8"))))
        # Tokens rarely outnumber bytes, so once the batch holds as many bytes as tokens are missing it is
        # tokenized rather than read further: costly sources (sampling) are not read beyond need.
        missing = heldout.need - min(heldout.length, heldout.need) + train.need - train.length
        if len(batch) == _TOKENIZE_BATCH or sum(size for _, size in batch) >= missing:
            tokenize_batch()
            if heldout.full and train.full:
                break
    if batch:  # the source ended before the last batch was full
        tokenize_batch()
    texts.close()  # releases the open files or connections of a source read only in part

    if not (heldout.full and train.full):
        usable = min(heldout.length, heldout.need) + train.length
        raise LensLabError(
            f"--data {spec.describe()} supplied {usable:,} usable tokens in {heldout.documents + train.documents:,} "
            f"documents but {heldout.need + train.need:,} are needed ({heldout.need // body} held-out then "
            f"{train.need // body} training chunks of {seq_len} for --heldout-tokens {heldout_tokens:,} and "
            f"--train-tokens {train_tokens:,}); lower those or --seq-len, or point --data at more text."
        )
    perm = torch.randperm(train.need // body, generator=torch.Generator().manual_seed(seed))
    text_tokens = heldout.text_tokens + train.text_tokens
    data = TokenData(
        train=train.chunks(prefix, seq_len)[perm],
        heldout=heldout.chunks(prefix, seq_len),
        seq_len=seq_len,
        bytes_per_token=(heldout.text_bytes + train.text_bytes) / text_tokens,
        source=spec.describe(),
        train_documents=train.documents,
        heldout_documents=heldout.documents,
    )
    log.info(
        "Prepared %d training and %d held-out chunks of %d tokens from %s (%.2f bytes per token)",
        len(data.train), len(data.heldout), seq_len, data.source, data.bytes_per_token,
    )  # fmt: skip
    return data
