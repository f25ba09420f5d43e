"""`lenslab eval`: score the logit lens and trained lenses at every layer on held-out text (`lenslab.runs.evaluate`).

    lenslab eval --model gpt2 --lens lenses/gpt2 --lens lenses/gpt2-jacobian --data text.txt --output eval.json

Writes the metrics as JSON (`EvalResult.to_json()` plus the data's provenance), a PNG of the per-layer curves
next to it (or at `--plot`), with `--transfer` a heatmap of every translator at every layer, and prints a table.
A trained lens is not scored on more of its training text than its training held out
(`lenslab.scoring.check_heldout`). `lenslab transfer` takes the same scoring flags (`SCORING`).
"""

from __future__ import annotations

from lenslab.cli.flags import LENSES, MODEL, TEXT, Command, Spec
from lenslab.specs import positive_int

SCORING = {
    "output": {"names": ("--output", "-o"), "metavar": "FILE.json"},
    "plot": {"metavar": "PATH"},
    "tokens": {"names": ("--tokens", "--heldout-tokens"), "type": positive_int, "metavar": "N"},
    "batch_size": {"type": positive_int, "metavar": "N"},
}
"""How the scoring flags, shared with `lenslab transfer`, read (`--heldout-tokens` is `lenslab train`'s name)."""

COMMANDS = [
    Command(
        "eval", "score lenses layer by layer on held-out text",
        "Score the logit lens and any trained lenses at every layer on held-out text: cross-entropy, KL to the "
        "model's prediction, entropy, top-1 agreement and marginal bias, as JSON, a table and a PNG.",
        (MODEL, LENSES, TEXT, Spec("lenslab.command_specs:EvalSpec", "scoring and output", flags=SCORING)),
        "lenslab.runs:evaluate",
    )
]  # fmt: skip
