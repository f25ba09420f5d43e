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

import argparse
import logging
from pathlib import Path

from rich.console import Console

from lenslab.cli.common import add_data_args, add_model_args, data_spec_from_args, load_model_from_args, positive_int
from lenslab.cli.outputs import check_output, mark

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 2**14
"""Held-out tokens scored when `--tokens` is not given."""
BATCH_TOKENS = 2**12
"""Tokens per forward when `--batch-size` is not given; every lens position is decoded for each of them."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "depth",
        help="prediction depth of tokens and its correlation with loss",
        description="For every held-out token, the earliest layer from which the lens's top-1 prediction equals the "
        "model's final prediction and stays equal (its prediction depth); the Spearman correlation of depth with "
        "the model's loss and, with --checkpoints, with the checkpoint at which training learned the token.",
    )
    add_model_args(parser)
    parser.add_argument("--lens", type=Path, metavar="DIR", help="trained tuned lens (default: the logit lens)")
    add_data_args(parser)
    parser.add_argument(
        "--tokens", "--heldout-tokens", dest="tokens", type=positive_int, default=DEFAULT_TOKENS, metavar="N",
        help=f"held-out tokens to score, from the start of the data (default {DEFAULT_TOKENS})",
    )  # fmt: skip
    checkpoints = parser.add_mutually_exclusive_group()
    checkpoints.add_argument(
        "--checkpoints", nargs="+", default=None, metavar="MODEL",
        help="the model's training checkpoints in training order (hub ids or directories, same tokenizer)",
    )  # fmt: skip
    checkpoints.add_argument(
        "--checkpoint-revisions", nargs="+", default=None, metavar="REVISION",
        help="the checkpoints as hub revisions of --model in training order (e.g. Pythia's step1000 step2000 ...)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=positive_int, default=None, metavar="N",
        help=f"sequences per forward pass (default: about {BATCH_TOKENS} tokens' worth)",
    )  # fmt: skip
    parser.add_argument(
        "--output", "-o", type=Path, required=True, metavar="FILE.json", help="where to write the depths"
    )
    parser.add_argument(
        "--plot", type=Path, metavar="PATH", help="where to write the histogram PNG (default: FILE.png)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `lenslab --help` does not pay for torch and transformers.
    from lenslab.adapter import ModelView
    from lenslab.applications.depth import add_learning_order, learned_checkpoint, prediction_depth
    from lenslab.artifacts import atomic_write_json
    from lenslab.data import prepare_tokens
    from lenslab.lenses import LogitLens, TunedLens
    from lenslab.plots.depth import plot_depth_histogram, print_depth_table

    plot_path = args.plot or args.output.with_suffix(".png")
    check_output(args.output, "--output", (".json",), args.command)
    check_output(plot_path, "--plot", (".png",), args.command)
    loaded = load_model_from_args(args)
    view = ModelView.from_model(loaded.model)
    lens = TunedLens.load(args.lens, view) if args.lens else LogitLens(view)
    data = prepare_tokens(
        data_spec_from_args(args), loaded.tokenizer, train_tokens=0, heldout_tokens=args.tokens,
        seq_len=args.seq_len, seed=args.seed, model=loaded.model,
    )  # fmt: skip
    batch_size = args.batch_size or max(1, BATCH_TOKENS // data.seq_len)
    result = prediction_depth(view, lens, data.heldout, batch_size=batch_size)
    if args.checkpoints or args.checkpoint_revisions:
        sources = [(name, None) for name in args.checkpoints or []]
        sources += [(args.model, revision) for revision in args.checkpoint_revisions or []]
        # One checkpoint in memory at a time: each is loaded when the previous one is done.
        models = (
            load_model_from_args(args, model=name, revision=revision).model for name, revision in sources
        )  # fmt: skip
        learned = learned_checkpoint(models, data.heldout, batch_size=batch_size)
        result = add_learning_order(result, learned, args.checkpoints or args.checkpoint_revisions)

    print_depth_table(result, lens_kind=lens.kind)
    plot_depth_histogram(result, plot_path, title=f"{view.model.config.name_or_path}: {lens.kind} lens")
    record = result.to_json() | {
        "lens": lens.kind,
        "lens_path": str(args.lens) if args.lens else None,
        "data": data.source,
        "seq_len": data.seq_len,
    } | mark(args.command)
    atomic_write_json(args.output, record)
    Console(stderr=True).print(f"Wrote {args.output}, {plot_path}")
    return 0
