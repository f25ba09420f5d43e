"""`lenslab cbe`: causal basis extraction, causal fidelity and stimulus–response alignment, layer by layer.

    lenslab cbe --model gpt2 --lens lenses/gpt2 --data text.txt --layers all --k 8 --tokens 4096 --output cbe/

Writes into the output directory, after everything is computed and each file atomically:

- ``bases.safetensors``: per layer ``layer.<l>`` [k, d_model] (rows = directions, most influential first), with
  ``influence.<l>``, ``mean.<l>`` (and ``partner.<l>`` for resample ablation) to reproduce the ablations;
- ``summary.json``: ``{"method", "ablation", "layers": {"<l>": {"lens_influence": [k], "model_influence": [k],
  "spearman", "seconds"}}, "alignment": {"<l>": similarity}}`` (influences in nats; ``seconds`` is the
  extraction's wall time) plus provenance;
- ``fidelity.png``: lens influence against model influence per layer.

Without ``--lens`` the logit lens is analysed. The sample is the first ``--tokens`` held-out tokens of the data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lenslab.cli.common import add_data_args, add_model_args, data_spec_from_args, load_model_from_args, positive_int
from lenslab.cli.outputs import check_output, mark
from lenslab.errors import LensLabError

DEFAULT_TOKENS = 4096
"""Residuals sampled per layer when `--tokens` is not given."""
DEFAULT_SEQ_LEN = 256
"""Tokens per sequence when `--seq-len` is not given (or the model's context, if shorter): many short sequences
give resample ablation many partners and the sample more documents."""
BATCH_TOKENS = 2**13
"""Tokens per model forward."""
SUMMARY_FILE = "summary.json"
FIDELITY_FILE = "fidelity.png"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cbe",
        help="causal basis extraction: the directions a lens depends on, and whether the model does too",
        description="Find the k most influential orthonormal directions of the residual stream for a lens at each "
        "layer (causal basis extraction), ablate each in the model to measure its influence there (causal "
        "fidelity, Spearman rho), and measure stimulus-response alignment. Writes bases.safetensors, "
        f"summary.json and fidelity.png into --output. --seq-len defaults to {DEFAULT_SEQ_LEN} here.",
    )
    add_model_args(parser)
    parser.add_argument("--lens", type=Path, metavar="DIR", help="a trained tuned lens (default: the logit lens)")
    add_data_args(parser)
    parser.add_argument(
        "--layers", default="all", metavar="all|L1,L2,...",
        help="lens positions to analyse: 'all' (0 .. num_layers - 1, where lenses differ from the model) or a "
        "comma-separated list; 0 is the embeddings, num_layers the last layer's output",
    )  # fmt: skip
    parser.add_argument("--k", type=positive_int, default=8, help="directions per layer (default: %(default)s)")
    parser.add_argument(
        "--tokens", type=positive_int, default=DEFAULT_TOKENS, metavar="N",
        help="residuals sampled per layer: the first N held-out tokens, whole sequences (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--method", choices=("fast", "reference"), default="fast",
        help="fast (joint frame from a Fisher start) or reference (tuned-lens's greedy L-BFGS) (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--ablation", choices=("mean", "zero", "resample"), default="mean",
        help="what replaces an ablated component: the sample mean, zero, or another sequence's (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=positive_int, default=None, metavar="N", help="sequences per forward")
    parser.add_argument("--output", "-o", type=Path, required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--allow-model-mismatch", action="store_true", help="apply a lens trained for another model of the same shape"
    )
    parser.set_defaults(run=run)


def parse_layers(text: str, num_layers: int) -> list[int]:
    """`--layers`: "all" -> 0..num_layers-1; "0,3,5" -> [0, 3, 5] (sorted, unique), each within 0..num_layers."""
    if text.strip().lower() == "all":
        return list(range(num_layers))
    try:
        layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise LensLabError(
            f"--layers {text!r} is not 'all' or a comma-separated list of integers; pass e.g. 0,3,5."
        ) from None
    bad = [layer for layer in layers if not 0 <= layer <= num_layers]
    if not layers or bad:
        raise LensLabError(
            f"--layers {text!r} names {bad or 'no'} layers outside the model's lens positions 0..{num_layers}; "
            f"pass positions in that range or 'all'."
        )
    return layers


def run(args: argparse.Namespace) -> int:
    # Imported here so that `lenslab --help` does not pay for torch and transformers.
    from lenslab.adapter import ModelView
    from lenslab.artifacts import atomic_write_json
    from lenslab.causal import (
        ExtractionConfig, capture_sample, causal_fidelity, extract_basis, save_bases, stimulus_response_alignment,
    )  # fmt: skip
    from lenslab.causal.basis import BASES_FILE, check_request
    from lenslab.plots.causal import plot_fidelity
    from lenslab.data import default_seq_len, prepare_tokens
    from lenslab.lenses import LogitLens, TunedLens

    for name in (BASES_FILE, SUMMARY_FILE, FIDELITY_FILE):
        check_output(args.output / name, "--output", (Path(name).suffix,), args.command)
    loaded = load_model_from_args(args)
    view = ModelView.from_model(loaded.model)
    check = "shapes" if args.allow_model_mismatch else "full"
    lens = TunedLens.load(args.lens, view, check=check) if args.lens else LogitLens(view)
    layers = parse_layers(args.layers, view.num_layers)
    config = ExtractionConfig(k=args.k, method=args.method, ablation=args.ablation, seed=args.seed)
    for layer in layers:  # fail on a bad --k before reading any data
        check_request(lens, layer, args.k)
    seq_len = args.seq_len or min(DEFAULT_SEQ_LEN, default_seq_len(loaded.model, loaded.tokenizer))
    data = prepare_tokens(
        data_spec_from_args(args), loaded.tokenizer, train_tokens=0, heldout_tokens=args.tokens, seq_len=seq_len,
        seed=args.seed, model=loaded.model,
    )  # fmt: skip
    input_ids = data.heldout
    batch_size = args.batch_size or max(1, BATCH_TOKENS // data.seq_len)
    n_seq = len(input_ids)

    bases, fidelities, alignments = [], [], []
    with _progress() as progress:
        task = progress.add_task("capturing residuals", total=n_seq)
        sample = capture_sample(
            view, input_ids, layers, batch_size=batch_size, progress=lambda n: progress.advance(task, n)
        )
        progress.remove_task(task)
        for layer in layers:
            steps = config.k if config.method == "reference" else config.fast.steps
            task = progress.add_task(f"layer {layer}: extracting", total=steps + 2 * n_seq)
            basis = extract_basis(lens, sample[layer], layer, config, progress=lambda _: progress.advance(task))
            progress.update(task, description=f"layer {layer}: fidelity")
            fidelities.append(
                causal_fidelity(
                    view, lens, input_ids, sample[layer], basis, batch_size=batch_size,
                    progress=lambda n: progress.advance(task, n),
                )
            )  # fmt: skip
            progress.update(task, description=f"layer {layer}: alignment")
            alignments.append(
                stimulus_response_alignment(
                    view, lens, input_ids, sample[layer], layer, seed=args.seed, batch_size=batch_size,
                    progress=lambda n: progress.advance(task, n),
                )
            )  # fmt: skip
            bases.append(basis)
            progress.remove_task(task)
            del sample[layer]  # residuals of a finished layer are not needed again

    summary = {
        "method": config.method,
        "ablation": config.ablation,
        "layers": {
            str(b.layer): {
                "lens_influence": f.lens_influence,
                "model_influence": f.model_influence,
                "spearman": f.spearman,
                "seconds": round(b.seconds, 3),
                "total_lens_influence": sum(f.lens_influence),
            }
            for b, f in zip(bases, fidelities)
        },
        "alignment": {str(a.layer): _finite_or_none(a.similarity) for a in alignments},
        "model": args.model,
        "lens": str(args.lens) if args.lens else "logit",
        "k": config.k,
        "tokens": int(input_ids.numel()),
        "seq_len": data.seq_len,
        "data": data.source,
        "seed": args.seed,
    } | mark(args.command)
    lens_name = f"tuned lens {args.lens}" if args.lens else "logit lens"
    save_bases(args.output / BASES_FILE, bases)
    atomic_write_json(args.output / SUMMARY_FILE, summary)
    plot_fidelity(fidelities, alignments, args.output / FIDELITY_FILE, title=f"{args.model}, {lens_name}")
    _print_table(summary, lens_name)
    Console(stderr=True).print(f"Wrote {BASES_FILE}, {SUMMARY_FILE} and {FIDELITY_FILE} in {args.output}")
    return 0


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: an undefined similarity (no token changed) is written as null."""
    return value if value == value else None


def _print_table(summary: dict, lens_name: str) -> None:
    table = Table(title=f"Causal bases of the {lens_name} ({summary['method']}, {summary['ablation']} ablation)")
    for column in ("layer", "total lens σ", "total model σ", "spearman", "alignment", "seconds"):
        table.add_column(column, justify="right")
    for layer, row in summary["layers"].items():
        rho, aligned = row["spearman"], summary["alignment"][layer]
        table.add_row(
            layer, f"{sum(row['lens_influence']):.4f}", f"{sum(row['model_influence']):.4f}",
            "n/a" if rho is None else f"{rho:.3f}", "n/a" if aligned is None else f"{aligned:.3f}",
            f"{row['seconds']:.1f}",
        )  # fmt: skip
    Console().print(table)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), transient=True,
    )  # fmt: skip
