"""Text for lenses: sources -> packed token chunks, with a held-out part and bytes per token for bits per byte.

A source is named by a `DataSpec` (the CLI's `--data` flags) and read by `sources`:

- a local `.txt` file (documents separated by blank lines), `.jsonl`/`.json` (one document per record, in the
  `text` field or `text_column`), `.parquet`, or a directory holding such files (read in sorted order, recursively);
- a Hugging Face dataset name, streamed with `datasets.load_dataset(name, config, split=..., streaming=True)`;
- `"self"`: text the model samples itself from an empty context (`sample_texts`), for models whose training data
  is unknown or whose own distribution is what matters (chat models);
- nothing: `DEFAULT_DATASET` (FineWeb-Edu's 10B-token sample), streamed from the hub. The tuned lens paper trained
  on the Pile, which is no longer distributed; FineWeb-Edu is the open web-text corpus most recent models are
  trained on or near, and streaming it reads only the first shard or so for the usual few million tokens.

Every source is read lazily (`sources`): `prepare_tokens` stops as soon as it holds the tokens asked for, so a
10-billion-token dataset costs only what is used. It tokenizes documents, appends the EOS token to each (documents
joined by EOS, as the tuned lens paper does) and cuts the stream into chunks of `seq_len` tokens, each starting with
BOS if the tokenizer puts one before its text (Llama, Gemma), since such models behave very differently without it.
The held-out part is the first whole documents of the source (`packing` says why); training chunks are shuffled
with the seed.

>>> spec = DataSpec("/work/shared/data/austen.txt")                       # doctest: +SKIP
>>> data = prepare_tokens(spec, tokenizer, train_tokens=2**19, heldout_tokens=2**16, model=model)  # doctest: +SKIP
>>> data.train.shape, data.heldout.shape, round(data.nats_to_bits_per_byte, 3)  # doctest: +SKIP
(torch.Size([2048, 256]), torch.Size([256, 256]), 0.326)
"""

from lenslab.data.packing import MAX_SEQ_LEN, TokenData, default_seq_len, heldout_span, prepare_tokens
from lenslab.data.sources import (
    DEFAULT_CONFIG,
    DEFAULT_DATASET,
    SELF,
    DataSpec,
    iter_texts,
    sample_texts,
)

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_DATASET",
    "MAX_SEQ_LEN",
    "SELF",
    "DataSpec",
    "TokenData",
    "default_seq_len",
    "heldout_span",
    "iter_texts",
    "prepare_tokens",
    "sample_texts",
]
