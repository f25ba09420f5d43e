"""`lenslab transfer`: score a base model's tuned lens on a fine-tuned relative of that model.

    lenslab transfer --lens lenses/base --model my-finetuned-model --data text.txt --output transfer.json
    lenslab transfer --lens lenses/base --model my-finetuned-model --own-lens lenses/finetuned --data ...

The base lens is loaded with the unembedding fingerprint check relaxed to shapes (same layers and width), and
a logged warning says so. It is scored beside the fine-tuned model's logit lens (``logit``) and, with `--own-lens`, a
tuned lens trained on the fine-tuned model itself (``own_tuned``); the base lens is ``base_tuned``. The JSON,
table and PNG are those of `lenslab eval`, plus a ``lens_transfer`` record of what was relaxed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lenslab.cli.common import add_data_args, add_model_args, load_model_from_args
from lenslab.cli.eval import add_output_args, check_outputs, evaluate_to_files


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "transfer",
        help="score a base model's tuned lens on a fine-tuned relative",
        description="Apply a tuned lens trained on a base model to a fine-tuned model of the same architecture "
        "and sizes (the fingerprint check is relaxed to shapes) and score it layer by layer beside the fine-tuned "
        "model's logit lens and, with --own-lens, its own tuned lens; output as in `lenslab eval`.",
    )
    add_model_args(parser)
    parser.add_argument("--lens", type=Path, required=True, metavar="DIR", help="tuned lens trained on the base model")
    parser.add_argument("--own-lens", type=Path, metavar="DIR", help="tuned lens trained on the fine-tuned --model")
    add_data_args(parser)
    add_output_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `lenslab --help` does not pay for torch.
    from lenslab.adapter import ModelView
    from lenslab.applications.transfer import BASE_TUNED, OWN_TUNED, transfer_lenses

    check_outputs(args)
    loaded = load_model_from_args(args)
    view = ModelView.from_model(loaded.model)
    # Lenses load before the data is read, so a lens of the wrong shape fails at once.
    # transfer_lenses logs a warning that the fingerprint check is relaxed; the CLI's logging shows it.
    lenses, note = transfer_lenses(view, args.lens, own_lens_dir=args.own_lens)
    paths = {BASE_TUNED: str(args.lens)} | ({OWN_TUNED: str(args.own_lens)} if args.own_lens else {})
    return evaluate_to_files(args, loaded, view, lenses, record={"lens_paths": paths, "lens_transfer": note})
