"""`lenslab transfer`: score a base model's tuned lens on a fine-tuned relative of that model
(`lenslab.runs.transfer`).

    lenslab transfer --lens lenses/base --model my-finetuned-model --data text.txt --output transfer.json
    lenslab transfer --lens lenses/base --model my-finetuned-model --own-lens lenses/finetuned --data ...

The base lens is loaded with the unembedding fingerprint check relaxed to shapes (same layers and width), and
a logged warning says so. It is scored beside the fine-tuned model's logit lens (``logit``) and, with `--own-lens`, a
tuned lens trained on the fine-tuned model itself (``own_tuned``); the base lens is ``base_tuned``. The JSON,
table and PNG are those of `lenslab eval`, plus a ``lens_transfer`` record of what was relaxed.
"""

from __future__ import annotations

from lenslab.cli.eval import SCORING
from lenslab.cli.flags import MODEL, TEXT, Command, Spec

LENS = {"metavar": "LENS"}
"""A lens folder or a hub reference (`lenslab.hub`)."""
COMMANDS = [
    Command(
        "transfer", "score a base model's tuned lens on a fine-tuned relative",
        "Apply a tuned lens trained on a base model to a fine-tuned model of the same architecture and sizes (the "
        "fingerprint check is relaxed to shapes) and score it layer by layer beside the fine-tuned model's logit "
        "lens and, with --own-lens, its own tuned lens; output as in `lenslab eval`.",
        (
            MODEL, Spec("lenslab.specs:TransferSpec", "lenses", flags={"lens": LENS, "own_lens": LENS}), TEXT,
            Spec("lenslab.command_specs:EvalSpec", "scoring and output", only=(*SCORING, "units"), flags=SCORING),
        ),
        "lenslab.runs:transfer",
    )
]  # fmt: skip
