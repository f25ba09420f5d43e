"""`lenslab detect`: detect attacked prompts from the trajectories of multiple-choice predictions.

    lenslab detect --model M --lens DIR --normal normal.jsonl --test test.jsonl --output report.json
    lenslab make-attacks --input mc.jsonl --output test.jsonl --kind injection --fraction 0.5 --seed 0

The first form fits Isolation Forest and Local Outlier Factor detectors on the choice-probability trajectories
of the normal prompts (tuned lens, logit lens or both: `--features`), scores the labelled test prompts, prints
an AUROC table with bootstrap 95% intervals (the Mahalanobis distance of the final residual is the baseline)
and writes it as JSON: ``{"detectors": {"tuned/isolation_forest": {"auroc": ..., "ci95": [lo, hi]}, ...}}``.

`lenslab make-attacks`, registered here because it serves only `detect`, turns any multiple-choice JSONL
(``{"prompt", "choices", "answer"}`` per line) into a labelled test set by attacking a share of it with an
injected instruction or with wrongly answered few-shot demonstrations; with `--fraction 0` it builds the
matching normal set (from other records). See
`lenslab.applications.attacks` and `lenslab.applications.prompts` for the formats. It is a subcommand of its own,
not `lenslab detect make-attacks`, because `detect` requires `--model` and `make-attacks` needs no model.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from lenslab.cli.common import add_model_args, load_model_from_args, positive_int
from lenslab.cli.outputs import check_output, mark
from lenslab.errors import LensLabError

if TYPE_CHECKING:
    from lenslab.applications.detect import DetectionReport

log = logging.getLogger(__name__)

FEATURES = ("both", "tuned", "logit")
"""Choices of `--features`: whose prediction trajectories the detectors see."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "detect",
        help="detect attacked prompts from the trajectories of multiple-choice predictions",
        description="Fit anomaly detectors on the layer-by-layer choice probabilities of normal multiple-choice "
        "prompts and report their AUROC on a labelled test set, beside a Mahalanobis baseline on the final "
        "residual. `lenslab make-attacks` builds a labelled test set from any multiple-choice file.",
    )
    add_model_args(parser)
    parser.add_argument("--lens", type=Path, metavar="DIR", help="trained tuned lens of --model")
    parser.add_argument(
        "--features", choices=FEATURES, default=None,
        help="trajectories to detect from (default: both with --lens, else logit)",
    )  # fmt: skip
    parser.add_argument(
        "--normal", type=Path, required=True, metavar="FILE.jsonl", help="normal prompts to fit the detectors on"
    )
    parser.add_argument(
        "--test", type=Path, required=True, metavar="FILE.jsonl", help="test prompts, each labelled normal or anomalous"
    )
    parser.add_argument(
        "--output", "-o", type=Path, required=True, metavar="FILE.json", help="where to write the AUROC report"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds Isolation Forest and the bootstrap (default 0)")
    parser.add_argument(
        "--resamples", type=positive_int, default=1000, metavar="N", help="bootstrap resamples for the 95%% intervals"
    )
    parser.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="sequences per forward pass")
    parser.set_defaults(run=run)

    attacks = subparsers.add_parser(
        "make-attacks",
        help="build a labelled test set for `lenslab detect` by attacking part of a multiple-choice JSONL",
        description="Attack a share of the records of a multiple-choice JSONL ({'prompt', 'choices', 'answer'} per "
        "line) and label every record normal or anomalous. injection: an instruction to answer a wrong choice "
        "before the prompt's last line. fewshot: demonstrations from other records, answered correctly for normal "
        "records and wrongly for attacked ones. --fraction 0 builds a normal set of the same layout.",
    )
    attacks.add_argument("--input", type=Path, required=True, metavar="FILE.jsonl", help="multiple-choice records")
    attacks.add_argument("--output", "-o", type=Path, required=True, metavar="FILE.jsonl", help="where to write them")
    # Checked by AttackConfig, which lists the kinds; importing it here would load torch for every `--help`.
    attacks.add_argument("--kind", default="injection", help="the attack: injection (default) or fewshot")
    attacks.add_argument("--fraction", type=float, default=0.5, help="share of records attacked (default 0.5)")
    attacks.add_argument("--seed", type=int, default=0, help="seeds the choice of records and answers (default 0)")
    attacks.add_argument("--shots", type=int, default=3, help="demonstrations per prompt for --kind fewshot")
    attacks.set_defaults(run=run_make_attacks)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `lenslab --help` does not pay for torch, transformers and scikit-learn.
    from lenslab.adapter import ModelView
    from lenslab.applications.detect import run_detection
    from lenslab.applications.prompts import read_choice_prompts
    from lenslab.artifacts import atomic_write_json
    from lenslab.lenses import LogitLens, TunedLens

    features = args.features or ("both" if args.lens else "logit")
    if features != "logit" and args.lens is None:
        raise LensLabError(f"--features {features} needs a tuned lens; pass --lens DIR or --features logit.")
    # The output path is checked and the prompt files are read first: a bad one fails before the model loads.
    check_output(args.output, "--output", (".json",), args.command)
    normal = read_choice_prompts(args.normal, "--normal")
    test = read_choice_prompts(args.test, "--test")
    loaded = load_model_from_args(args)
    view = ModelView.from_model(loaded.model)
    lenses = {}
    if features in ("both", "tuned"):
        lenses["tuned"] = TunedLens.load(args.lens, view)
    if features in ("both", "logit"):
        lenses["logit"] = LogitLens(view)
    with Console(stderr=True).status("scoring prompts"):
        report = run_detection(
            view, loaded.tokenizer, lenses, normal, test, seed=args.seed, resamples=args.resamples,
            batch_size=args.batch_size,
        )  # fmt: skip
    print_report(report)
    record = report.to_json() | {
        "model": args.model,
        "lens_path": str(args.lens) if args.lens else None,
        "normal": str(args.normal),
        "test": str(args.test),
    } | mark(args.command)
    atomic_write_json(args.output, record)
    Console(stderr=True).print(f"Wrote {args.output}")
    return 0


def run_make_attacks(args: argparse.Namespace) -> int:
    from lenslab.applications.attacks import AttackConfig, make_attacks
    from lenslab.applications.prompts import read_choice_prompts, write_choice_prompts

    config = AttackConfig(kind=args.kind, fraction=args.fraction, seed=args.seed, shots=args.shots)
    check_output(args.output, "--output", (".jsonl",), args.command)
    records = make_attacks(read_choice_prompts(args.input, "--input"), config)
    write_choice_prompts(args.output, records)
    attacked = sum(record.label == "anomalous" for record in records)
    Console(stderr=True).print(f"Wrote {args.output}: {attacked} of {len(records)} records attacked ({args.kind})")
    return 0


def print_report(report: DetectionReport, *, console: Console | None = None) -> None:
    """Print one row per detector: AUROC and its bootstrap 95% interval."""
    table = Table(
        title="Anomaly detection AUROC",
        caption=f"fitted on {report.n_normal} normal prompts; tested on {report.n_test_normal} normal and "
        f"{report.n_test_anomalous} anomalous; 95% CI from {report.bootstrap['resamples']} stratified bootstrap "
        "resamples",
    )
    for column, justify in (("features", "left"), ("detector", "left"), ("AUROC", "right"), ("95% CI", "right")):
        table.add_column(column, justify=justify)
    for name, score in report.detectors.items():
        features, detector = name.split("/", 1)
        table.add_row(features, detector, f"{score.auroc:.3f}", f"[{score.ci95[0]:.3f}, {score.ci95[1]:.3f}]")
    (console or Console()).print(table)
