"""`lenslab depth`: prediction depth of every token, its correlation with loss and with training order.

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

from typing import TYPE_CHECKING

from lenslab.cli import console
from lenslab.cli.flags import LENSES, MODEL, TEXT, Command, Spec
from lenslab.cli.outputs import check_output, mark
from lenslab.specs import positive_int

if TYPE_CHECKING:
    from lenslab.applications.depth import DepthResult
    from lenslab.specs import DepthSpec, LensSpec, ModelSpec, TextSpec

BATCH_TOKENS = 2**12
"""Tokens per forward when `--batch-size` is not given; every lens position is decoded for each of them."""


def run(model: ModelSpec, lenses: LensSpec, text: TextSpec, spec: DepthSpec) -> None:
    # Imported here so that `lenslab --help` does not pay for torch and transformers.
    from lenslab.adapter import ModelView
    from lenslab.applications.depth import add_learning_order, learned_checkpoint, prediction_depth
    from lenslab.io import atomic_write_json
    from lenslab.plots.depth import plot_depth_histogram, print_depth_table

    check_output(spec.output, "--output", (".json",), "depth")
    check_output(spec.plot_path, "--plot", (".png",), "depth")
    loaded = model.load()
    view = ModelView.from_model(loaded.model)
    lens = lenses.one(view)
    data = text.tokens(loaded, heldout=spec.tokens)
    batch_size = spec.batch_size or max(1, BATCH_TOKENS // data.seq_len)
    result = prediction_depth(view, lens, data.heldout, batch_size=batch_size)
    if spec.checkpoints or spec.checkpoint_revisions:
        sources = [(name, None) for name in spec.checkpoints or []]
        sources += [(model.model, revision) for revision in spec.checkpoint_revisions or []]
        # One checkpoint in memory at a time: each is loaded when the previous one is done.
        models = (model.load(model=name, revision=revision).model for name, revision in sources)
        learned = learned_checkpoint(models, data.heldout, batch_size=batch_size)
        result = add_learning_order(result, learned, spec.checkpoints or spec.checkpoint_revisions)

    print_depth_table(result, lens_kind=lens.kind)
    plot_depth_histogram(result, spec.plot_path, model=model.model, lens_kind=lens.kind)
    record = {"lens": lens.kind, "lens_path": str(lenses.lens[0]) if lenses.lens else None}
    record |= {"data": data.source, "seq_len": data.seq_len}
    atomic_write_json(spec.output, result.to_json() | record | mark("depth"))
    console.conclude([spec.output, spec.plot_path], reading(result, lens.kind))


def reading(result: DepthResult, lens_kind: str) -> tuple[str, str]:
    """The typical depth, and how depth goes with loss (and with training order)."""
    depths = result.depths.flatten().float()
    first = (
        f"through the {lens_kind} lens the median token's prediction settles at depth {depths.median():.0f} of "
        f"{result.num_layers} (mean {depths.mean():.2f})"
    )
    rho = result.spearman_depth_loss
    second = (
        "depth and loss are uncorrelated (a constant)"
        if rho != rho
        else (f"tokens settled deeper have {'higher' if rho > 0 else 'lower'} loss (Spearman {rho:.2f})")
    )
    if result.spearman_depth_learned is not None and result.spearman_depth_learned == result.spearman_depth_learned:
        second += f"; depth against learning checkpoint: Spearman {result.spearman_depth_learned:.2f}"
    return first, second


COMMANDS = [
    Command(
        "depth", "prediction depth of tokens and its correlation with loss",
        "For every held-out token, the earliest layer from which the lens's top-1 prediction equals the model's "
        "final prediction and stays equal (its prediction depth); the Spearman correlation of depth with the "
        "model's loss and, with --checkpoints, with the checkpoint at which training learned the token.",
        (
            MODEL, LENSES, TEXT,
            Spec("lenslab.specs:DepthSpec", "depth and output", flags={
                "output": {"names": ("--output", "-o"), "metavar": "FILE.json"}, "plot": {"metavar": "PATH"},
                "tokens": {"names": ("--tokens", "--heldout-tokens"), "type": positive_int, "metavar": "N"},
                "batch_size": {"type": positive_int, "metavar": "N"},
                "checkpoints": {"nargs": "+", "metavar": "MODEL"},
                "checkpoint_revisions": {"nargs": "+", "metavar": "REVISION"},
            }),
        ),
        run,
    )
]  # fmt: skip
