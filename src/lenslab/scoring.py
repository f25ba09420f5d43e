"""Scoring lenses on held-out text, as `lenslab eval` and `lenslab transfer` do: the tokens are read, a lens is refused
text it was trained on (`check_heldout`), every lens is scored at every layer and, if asked, every translator of a
lens at every layer (`lenslab.evaluate`).

>>> lenses = {"logit": LogitLens(view)}  # doctest: +SKIP
>>> scores = score_heldout(loaded, view, lenses, TextSpec("text.txt"), tokens=4096)  # doctest: +SKIP
>>> scores.result.lenses["logit"].kl  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lenslab.data import heldout_span
from lenslab.errors import LensLabError
from lenslab.evaluate import EvalResult, evaluate_lenses, transfer_matrix

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lenslab.adapter import ModelView
    from lenslab.data import DataSpec
    from lenslab.lenses import Lens
    from lenslab.loading import LoadedModel
    from lenslab.specs import TextSpec

log = logging.getLogger(__name__)

BATCH_TOKENS = 2**13
"""Tokens per forward when no batch size is given (as in training)."""
_HELDOUT_KEYS = ("heldout_tokens", "seq_len")
"""What a lens's training record (`metadata["data"]`) must hold for `check_heldout` to know its held-out span."""

Stage = Callable[[str, int | None], Callable[[int], None]]
"""Progress of a long call: `stage(description, total)` starts a stage (total None: of unknown length) and returns
`advance(n)`, called as work is done (`lenslab.cli.console.run` draws it)."""


@dataclass
class HeldoutScores:
    """Per-layer metrics of several lenses, and the text they were scored on."""

    result: EvalResult
    source: str
    """The text's description (`DataSpec.describe`)."""
    seq_len: int
    """Tokens per scored sequence."""


def score_heldout(
    loaded: LoadedModel,
    view: ModelView,
    lenses: dict[str, Lens],
    text: TextSpec,
    *,
    tokens: int,
    batch_size: int | None = None,
    transfer: Sequence[str] = (),
    stage: Stage | None = None,
) -> HeldoutScores:
    """Score `lenses` on the first `tokens` held-out tokens of `text`, with a transfer matrix for each lens named in
    `transfer`; `batch_size` sequences per forward (default: about `BATCH_TOKENS` tokens)."""
    seq_len = text.chunk_length(loaded)
    check_heldout(lenses, text.source(), loaded.tokenizer, tokens=tokens, seq_len=seq_len)
    data = text.tokens(loaded, heldout=tokens, seq_len=seq_len)
    batch_size = batch_size or max(1, BATCH_TOKENS // data.seq_len)
    batches = -(-len(data.heldout) // batch_size)

    def advance(description: str) -> Callable[[int], None] | None:
        """One tick per batch, so the bar moves and its ETA is known after the first."""
        if stage is None:
            return None
        tick = stage(description, batches)
        return lambda _: tick(1)

    result = evaluate_lenses(
        view, lenses, data.heldout, batch_size=batch_size, bits_per_byte_factor=data.nats_to_bits_per_byte,
        progress=advance("scoring lenses"),
    )  # fmt: skip
    for name in transfer:
        result.transfer[name] = transfer_matrix(
            view, lenses[name], data.heldout, batch_size=batch_size, progress=advance(f"transfer matrix of {name}")
        )
    return HeldoutScores(result, data.source, data.seq_len)


def check_heldout(
    lenses: dict[str, Lens], spec: DataSpec, tokenizer: PreTrainedTokenizerBase, *, tokens: int, seq_len: int
) -> None:
    """Refuse to score a lens on text it was trained on: more than the held-out span its training recorded
    (`metadata["data"]`, see `lenslab train`) of the same source; warn when the source differs, as the same text
    could sit under another name. Lenses without such a record (the logit lens, tuned-lens files) pass."""
    needed = heldout_span(tokenizer, heldout_tokens=tokens, seq_len=seq_len)
    for name, lens in lenses.items():
        record = (getattr(lens, "metadata", None) or {}).get("data")
        if not isinstance(record, dict) or not all(isinstance(record.get(k), int) for k in _HELDOUT_KEYS):
            continue
        held = heldout_span(tokenizer, heldout_tokens=record["heldout_tokens"], seq_len=record["seq_len"])
        if needed <= held:
            continue
        trained_on = str(record.get("source"))
        if not spec.same_source(trained_on):
            log.warning(
                "Lens %r held out only the first %d tokens of %s in training; --data %s is another source, so make "
                "sure it does not hold that training text.",
                name, record["heldout_tokens"], trained_on, spec.describe(),
            )  # fmt: skip
            continue
        # Whole chunks of seq_len whose stream tokens fit in the held-out span.
        limit = held // heldout_span(tokenizer, heldout_tokens=seq_len, seq_len=seq_len) * seq_len
        if limit:
            fix = f"pass --tokens {limit} or fewer"
        elif held:
            fix = f"pass --seq-len {record['seq_len']} --tokens {record['heldout_tokens']}"
        else:
            fix = "pass as --data text it was not trained on"
        raise LensLabError(
            f"--tokens {tokens} would score lens {name!r} on its own training text: its training held out only the "
            f"first {record['heldout_tokens']} tokens of {trained_on} (in chunks of {record['seq_len']}); {fix}."
        )
