"""`lenslab show`: what every layer predicts at every token of a prompt, as a picture, JSON or a table.

    lenslab show --model gpt2 --lens lenses/gpt2 --stat entropy --output out.html "The capital of France is"

The output format follows the extension of ``--output``: ``.html`` (interactive, plotly, works offline),
``.png`` (matplotlib) or ``.json`` (``lenslab.trajectory.trajectories_to_dict``: one trajectory object for
the logit lens alone, ``{"lenses": {"logit": {...}, "tuned": {...}}}`` with ``--lens``). Without
``--output`` a coloured table is printed to the terminal. Everything is computed before anything is
written, and files are written atomically.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from lenslab.cli.common import add_model_args, load_model_from_args, positive_int
from lenslab.cli.outputs import check_output, mark
from lenslab.errors import LensLabError

FORMATS = (".html", ".png", ".json")
"""Output formats, chosen by the extension of ``--output``."""
STAT_CHOICES = ("entropy", "prob", "rank", "kl", "target")
"""Names of ``lenslab.trajectory.STATISTICS``, repeated here so that ``--help`` does not import torch."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "show",
        help="picture what every layer predicts at every token of a prompt",
        description="Show the top predictions of every layer at every token of a prompt through the logit lens "
        "(and a tuned lens with --lens): an interactive HTML heatmap, a PNG, JSON, or a table in the terminal.",
    )
    add_model_args(parser)
    parser.add_argument("prompt", nargs="?", help="the prompt text (or use --prompt-file)")
    parser.add_argument(
        "--prompt-file", type=Path, metavar="FILE",
        help="read the prompt from a UTF-8 file (one final newline is dropped)",
    )  # fmt: skip
    parser.add_argument(
        "--lens", type=Path, metavar="DIR",
        help="a trained tuned lens, shown beside the logit lens on one colour scale",
    )  # fmt: skip
    parser.add_argument(
        "--stat", choices=STAT_CHOICES, default="entropy",
        help="what the colour shows: entropy, probability or rank of the true next token, KL to the model's output, "
        "or the target score (default: entropy)",
    )  # fmt: skip
    parser.add_argument(
        "--top-k", type=positive_int, default=5, metavar="K", help="tokens listed per cell (default: 5)"
    )
    parser.add_argument(
        "--positions", type=parse_positions, metavar="START:END",
        help="show only tokens START..END-1 of the prompt (either may be omitted); tokens after END are not fed "
        "to the model, so this also fits a long prompt into the model's context",
    )  # fmt: skip
    parser.add_argument(
        "--target", action="append", default=[], metavar="TOKEN",
        help="a single token whose log-probability --stat target shows; repeat for a set (mind leading spaces)",
    )  # fmt: skip
    parser.add_argument(
        "--anti-target", action="append", default=[], metavar="TOKEN",
        help="a token whose log-probability is subtracted from the target's; repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--output", "-o", type=Path, metavar="FILE",
        help=f"write {', '.join(FORMATS)} by extension; without it, print a table to the terminal",
    )  # fmt: skip
    parser.add_argument(
        "--allow-model-mismatch", action="store_true",
        help="apply a lens trained for another model of the same shape (e.g. the base of a fine-tune)",
    )  # fmt: skip
    parser.set_defaults(run=run)


def parse_positions(text: str) -> slice:
    """``"START:END"`` (either part may be empty or negative) -> ``slice(START, END)``."""
    start, separator, end = text.partition(":")
    try:
        if not separator:
            raise ValueError
        return slice(int(start) if start.strip() else None, int(end) if end.strip() else None)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not START:END; pass e.g. --positions 0:50 or --positions 100:"
        ) from None


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt from the positional argument or ``--prompt-file`` (exactly one of them)."""
    if args.prompt is not None and args.prompt_file is not None:
        raise LensLabError("Both a PROMPT argument and --prompt-file were given; pass only one of them.")
    if args.prompt_file is None:
        if args.prompt is None:
            raise LensLabError("No prompt was given; pass the prompt text as an argument or --prompt-file FILE.")
        return args.prompt
    try:
        text = args.prompt_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise LensLabError(
            f"Could not read --prompt-file {args.prompt_file} ({error}); pass a readable UTF-8 text file."
        ) from None
    # Editors end files with a newline that is not part of the prompt.
    return text.removesuffix("\n")


def run(args: argparse.Namespace) -> int:
    # Imported here so that `lenslab --help` does not pay for torch, transformers, plotly and matplotlib.
    from lenslab.adapter import ModelView
    from lenslab.artifacts import atomic_write_json
    from lenslab.lenses import LogitLens, TunedLens
    from lenslab.tokens import single_token_id
    from lenslab.trajectory import (
        EMPTY_PROMPT,
        TrajectoryConfig,
        compute_trajectories,
        encode_prompt,
        trajectories_to_dict,
    )

    text = read_prompt(args)
    if not text:  # found before the model loads, which can take minutes
        raise LensLabError(EMPTY_PROMPT)
    if args.output is not None:
        check_output(args.output, "--output", FORMATS, args.command)
    suffix = args.output.suffix.lower() if args.output else None
    if args.stat == "target" and not args.target:
        raise LensLabError(
            "--stat target shows the target's log-probability, but no target was given; pass --target TOKEN."
        )
    config = TrajectoryConfig(top_k=args.top_k, positions=args.positions)  # checks --positions before loading

    loaded = load_model_from_args(args)
    view = ModelView.from_model(loaded.model)
    lenses = [LogitLens(view)]
    if args.lens is not None:
        lenses.append(TunedLens.load(args.lens, view, check="shapes" if args.allow_model_mismatch else "full"))
    config = replace(
        config,
        targets=tuple(single_token_id(loaded.tokenizer, target, "--target") for target in args.target),
        anti_targets=tuple(single_token_id(loaded.tokenizer, anti, "--anti-target") for anti in args.anti_target),
    )
    ids = encode_prompt(loaded.tokenizer, text)
    trajectories = compute_trajectories(view, lenses, ids, tokenizer=loaded.tokenizer, config=config)

    if suffix is None:
        from lenslab.plots.terminal import tables

        console = Console()
        for table in tables(trajectories, args.stat, width=console.width):
            console.print(table)
        return 0
    if suffix == ".html":
        from lenslab.plots.html import write_html

        write_html(trajectories, args.output, args.stat)
    elif suffix == ".png":
        from lenslab.plots.png import write_png

        write_png(trajectories, args.output, args.stat)
    else:
        atomic_write_json(args.output, trajectories_to_dict(trajectories) | mark(args.command))
    Console(stderr=True).print(f"Wrote {args.output}", markup=False, highlight=False)
    return 0
