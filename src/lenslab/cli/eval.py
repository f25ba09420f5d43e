"""`lenslab eval`: score the logit lens and trained lenses at every layer on held-out text.

    lenslab eval --model gpt2 --lens lenses/gpt2 --data text.txt --tokens 65536 --output eval.json

Writes the metrics as JSON (`EvalResult.to_json()` plus the data's provenance), a PNG of the per-layer curves
next to it (or at `--plot`), with `--transfer` a heatmap of every translator at every layer, and prints a table.
The output paths are checked before the model loads (`lenslab.cli.outputs`), everything is computed before anything
is written, and every file is written atomically, so a failed run leaves earlier outputs as they were. A trained
lens is not scored on more of its training data than its training held out (`check_heldout`).

Other subcommands that score lenses the same way (`lenslab transfer`) reuse `add_output_args`, `check_outputs`,
`evaluate_to_files` and `print_table`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from lenslab.cli.common import add_data_args, add_model_args, data_spec_from_args, load_model_from_args, positive_int
from lenslab.cli.outputs import check_output, mark
from lenslab.errors import LensLabError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lenslab.adapter import ModelView
    from lenslab.data import DataSpec
    from lenslab.evaluate import EvalResult
    from lenslab.lenses import Lens
    from lenslab.loading import LoadedModel

log = logging.getLogger(__name__)

UNITS = ("bits-per-byte", "nats")
"""Choices of `--units`, as `EvalResult.unit_factor` takes them."""
DEFAULT_TOKENS = 2**16
"""Held-out tokens scored when `--tokens` is not given."""
BATCH_TOKENS = 2**13
"""Tokens per forward when `--batch-size` is not given (as in training)."""
_HELDOUT_KEYS = ("heldout_tokens", "seq_len")
"""What a lens's training record (`metadata["data"]`) must hold for `check_heldout` to know its held-out span."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score lenses layer by layer on held-out text",
        description="Score the logit lens and any trained lenses at every layer on held-out text: cross-entropy, "
        "KL to the model's prediction, entropy, top-1 agreement and marginal bias, as JSON, a table and a PNG.",
    )
    add_model_args(parser)
    parser.add_argument(
        "--lens", action="append", default=[], type=Path, metavar="DIR",
        help="a trained lens directory; repeat to compare several (the logit lens is always evaluated)",
    )  # fmt: skip
    parser.add_argument(
        "--allow-model-mismatch", action="store_true",
        help="apply lenses trained for another model of the same shape (e.g. the base of a fine-tune)",
    )  # fmt: skip
    parser.add_argument(
        "--transfer", action="store_true",
        help="also apply every translator at every layer (JSON key 'transfer' and a FILE-transfer.png heatmap)",
    )  # fmt: skip
    add_data_args(parser)
    add_output_args(parser)
    parser.set_defaults(run=run)


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """Add `--tokens`, `--batch-size`, `--output`, `--plot` and `--units`, which `evaluate_to_files` reads."""
    # Also spelled like `lenslab train`'s flag, which the data module names in its errors.
    parser.add_argument(
        "--tokens", "--heldout-tokens", dest="tokens", type=positive_int, default=DEFAULT_TOKENS, metavar="N",
        help=f"held-out tokens to score, from the start of the data, which training leaves out "
        f"(default {DEFAULT_TOKENS})",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=positive_int, default=None, metavar="N",
        help=f"sequences per forward pass (default: about {BATCH_TOKENS} tokens' worth)",
    )  # fmt: skip
    parser.add_argument(
        "--output", "-o", type=Path, required=True, metavar="FILE.json", help="where to write the metrics"
    )
    parser.add_argument("--plot", type=Path, metavar="PATH", help="where to write the PNG (default: FILE.png)")
    parser.add_argument("--units", choices=UNITS, default=UNITS[0], help="units of the table and the plots")


def run(args: argparse.Namespace) -> int:
    from lenslab.adapter import ModelView  # imported here so that `lenslab --help` does not pay for torch
    from lenslab.lenses import LogitLens, TunedLens

    if args.transfer and not args.lens:
        raise LensLabError("--transfer needs a trained lens to apply at other layers; pass --lens DIR.")
    check_outputs(args, transfer=args.transfer)
    loaded = load_model_from_args(args)
    view = ModelView.from_model(loaded.model)
    # Lenses load before the data is read, so a lens for another model fails at once.
    directories = lens_names(args.lens)
    check = "shapes" if args.allow_model_mismatch else "full"
    trained = {name: TunedLens.load(directory, view, check=check) for name, directory in directories.items()}
    return evaluate_to_files(
        args, loaded, view, {"logit": LogitLens(view), **trained},
        transfer=list(trained) if args.transfer else [],
        record={"lens_paths": {name: str(directory) for name, directory in directories.items()}},
    )  # fmt: skip


def output_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """The PNGs `evaluate_to_files` writes: the per-layer curves (`--plot`, by default FILE.png) and the transfer
    heatmap beside them."""
    plot_path = args.plot or args.output.with_suffix(".png")
    return plot_path, plot_path.with_name(f"{plot_path.stem}-transfer.png")


def check_outputs(args: argparse.Namespace, *, transfer: bool = False) -> None:
    """Refuse, before the model loads, an `--output` or `--plot` that `evaluate_to_files` cannot or must not write."""
    plot_path, transfer_path = output_paths(args)
    check_output(args.output, "--output", (".json",), args.command)
    for path in [plot_path, transfer_path] if transfer else [plot_path]:
        check_output(path, "--plot", (".png",), args.command)


def evaluate_to_files(
    args: argparse.Namespace,
    loaded: LoadedModel,
    view: ModelView,
    lenses: dict[str, Lens],
    *,
    transfer: Sequence[str] = (),
    record: dict | None = None,
) -> int:
    """Score `lenses` of `view` on the held-out tokens the flags name; print the table, write PNG(s) and JSON.

    `args` holds the flags of `add_data_args` and `add_output_args`; `transfer` names the lenses that also get a
    transfer matrix; `record` is merged into the JSON. Nothing is written until everything is computed.
    Returns the exit code, 0.
    """
    from lenslab.artifacts import atomic_write_json
    from lenslab.data import default_seq_len, prepare_tokens
    from lenslab.evaluate import evaluate_lenses, transfer_matrix
    from lenslab.plots import plot_curves, plot_transfer

    plot_path, transfer_path = output_paths(args)
    spec = data_spec_from_args(args)
    seq_len = args.seq_len or default_seq_len(loaded.model, loaded.tokenizer)
    check_heldout(lenses, spec, loaded.tokenizer, tokens=args.tokens, seq_len=seq_len)
    data = prepare_tokens(
        spec, loaded.tokenizer, train_tokens=0, heldout_tokens=args.tokens, seq_len=seq_len, seed=args.seed,
        model=loaded.model,
    )  # fmt: skip
    batch_size = args.batch_size or max(1, BATCH_TOKENS // data.seq_len)
    with _progress() as progress:
        task = progress.add_task("scoring lenses", total=len(data.heldout))
        result = evaluate_lenses(
            view, lenses, data.heldout, batch_size=batch_size, bits_per_byte_factor=data.nats_to_bits_per_byte,
            progress=lambda n: progress.advance(task, n),
        )  # fmt: skip
        for name in transfer:
            task = progress.add_task(f"transfer matrix of {name}", total=len(data.heldout))
            result.transfer[name] = transfer_matrix(
                view, lenses[name], data.heldout, batch_size=batch_size,
                progress=lambda n, task=task: progress.advance(task, n),
            )  # fmt: skip

    print_table(result, units=args.units)
    written = [plot_curves(result, plot_path, units=args.units)]
    if transfer:
        written.append(plot_transfer(result, transfer_path, units=args.units))
    atomic_write_json(
        args.output,
        result.to_json() | {"data": data.source, "seq_len": data.seq_len} | (record or {}) | mark(args.command),
    )
    Console(stderr=True).print("Wrote " + ", ".join(str(path) for path in [args.output, *written]))
    return 0


def check_heldout(
    lenses: dict[str, Lens], spec: DataSpec, tokenizer: PreTrainedTokenizerBase, *, tokens: int, seq_len: int
) -> None:
    """Refuse to score a lens on text it was trained on: more than the held-out span its training recorded
    (`metadata["data"]`, see `lenslab train`) of the same source; warn when the source differs, as the same text
    could sit under another name. Lenses without such a record (the logit lens, tuned-lens files) pass."""
    from lenslab.data import heldout_span

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


def lens_names(directories: list[Path]) -> dict[str, Path]:
    """Name each lens directory: "tuned" when there is one, else its directory name, made unique with -2, -3...

    The same directory given twice is evaluated once; "logit" is kept for the logit lens.
    """
    unique = list({directory.resolve(): directory for directory in directories}.values())
    if len(unique) == 1:
        return {"tuned": unique[0]}
    names: dict[str, Path] = {}
    for directory in unique:
        base = directory.resolve().name or "lens"
        name, suffix = base, 1
        while name in names or name == "logit":
            suffix += 1
            name = f"{base}-{suffix}"
        names[name] = directory
    return names


def print_table(result: EvalResult, *, units: str = "bits-per-byte", console: Console | None = None) -> None:
    """Print a layers x lenses table of cross-entropy, KL to the model and top-1 agreement.

    CE and KL are shown in `units` ("bits-per-byte" or "nats"); the caption gives the model's own CE in both.
    """
    factor = result.unit_factor(units)
    unit = "bpb" if units == "bits-per-byte" else "nats"
    table = Table(title=f"{result.model}: {result.tokens:,} held-out tokens", caption=_caption(result))
    table.add_column("layer")
    for name in result.lenses:
        table.add_column(f"{name}\nCE ({unit})", justify="right")
        table.add_column(f"{name}\nKL ({unit})", justify="right")
        table.add_column(f"{name}\ntop-1", justify="right")
    for position, layer in enumerate(result.layers):
        cells = [layer]
        for metrics in result.lenses.values():
            cells += [
                f"{metrics.ce[position] * factor:.3f}",
                f"{metrics.kl[position] * factor:.3f}",
                f"{metrics.top1_agreement[position]:.1%}",
            ]
        table.add_row(*cells)
    (console or Console()).print(table)


def _caption(result: EvalResult) -> str:
    nats = f"model CE {result.final_ce:.3f} nats/token, entropy {result.final_entropy:.3f} nats/token"
    if result.nats_to_bits_per_byte is None:
        return nats
    bits = result.final_ce * result.nats_to_bits_per_byte
    return f"{nats}; CE {bits:.3f} bits/byte (1 nat/token = {result.nats_to_bits_per_byte:.3f} bits/byte)"


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=True,
    )  # fmt: skip
