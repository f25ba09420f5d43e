"""`lenslab depth`: prediction depth of every token, its correlation with loss and with training order
(`lenslab.runs.depth`).

    lenslab depth --model M --lens DIR --data text.txt --output depth.json
    lenslab depth --model M --lens DIR --data text.txt --output depth.json --checkpoints ckpt/step1000 ckpt/step2000 M
    lenslab depth --model EleutherAI/pythia-160m --lens DIR --data text.txt --output depth.json \
        --checkpoint-revisions step1000 step10000 step143000

Writes `DepthResult.to_json()` (per-token depths and losses, chunk after chunk, the depth histogram and the
Spearman correlations) plus the data's provenance, a histogram PNG next to it (or at `--plot`), and prints the
histogram as a table. Without `--lens` the depths are those of the logit lens. `--checkpoints` are the model's
training checkpoints in training order (hub ids or local directories), or `--checkpoint-revisions` the hub
revisions of `--model` that hold them (Pythia's `step1000`, ...); each token's learning checkpoint is the first
from which the checkpoint's top-1 prediction is right and stays right.
"""

from __future__ import annotations

from lenslab.cli.eval import SCORING
from lenslab.cli.flags import LENSES, MODEL, TEXT, Command, Spec

COMMANDS = [
    Command(
        "depth", "prediction depth of tokens and its correlation with loss",
        "For every held-out token, the earliest layer from which the lens's top-1 prediction equals the model's "
        "final prediction and stays equal (its prediction depth); the Spearman correlation of depth with the "
        "model's loss and, with --checkpoints, with the checkpoint at which training learned the token.",
        (
            MODEL, LENSES, TEXT,
            Spec("lenslab.command_specs:DepthSpec", "depth and output", flags=SCORING | {
                "checkpoints": {"nargs": "+", "metavar": "MODEL"},
                "checkpoint_revisions": {"nargs": "+", "metavar": "REVISION"},
            }),
        ),
        "lenslab.runs:depth",
    )
]  # fmt: skip
