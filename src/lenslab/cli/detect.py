"""`lenslab detect`: detect attacked prompts from the trajectories of multiple-choice predictions.

    lenslab detect --model M --lens DIR --normal normal.jsonl --test test.jsonl --output report.json
    lenslab make-attacks --input mc.jsonl --output test.jsonl --kind injection --fraction 0.5 --seed 0

The first form fits Isolation Forest and Local Outlier Factor detectors on the choice-probability trajectories
of the normal prompts (tuned lens, logit lens or both: `--features`), scores the labelled test prompts, prints
an AUROC table with bootstrap 95% intervals (the Mahalanobis distance of the final residual is the baseline)
and writes it as JSON: ``{"detectors": {"tuned/isolation_forest": {"auroc": ..., "ci95": [lo, hi]}, ...}}``.

`lenslab make-attacks`, here because it serves only `detect`, turns any multiple-choice JSONL (``{"prompt",
"choices", "answer"}`` per line) into a labelled test set by attacking a share of it with an injected instruction or
with wrongly answered few-shot demonstrations; with `--fraction 0` it builds the matching normal set (from other
records). See `lenslab.applications.attacks` and `lenslab.applications.prompts` for the formats. It is a subcommand
of its own, not `lenslab detect make-attacks`, because `detect` requires `--model` and `make-attacks` needs no model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from lenslab.cli import console
from lenslab.cli.flags import LENSES, MODEL, Command, Spec
from lenslab.cli.outputs import check_output, mark
from lenslab.errors import LensLabError
from lenslab.specs import positive_int

if TYPE_CHECKING:
    from lenslab.applications.attacks import AttackConfig
    from lenslab.applications.detect import DetectionReport
    from lenslab.specs import AttackFiles, DetectSpec, LensSpec, ModelSpec


def run(model: ModelSpec, lenses: LensSpec, spec: DetectSpec) -> None:
    # Imported here so that `lenslab --help` does not pay for torch, transformers and scikit-learn.
    from lenslab.adapter import ModelView
    from lenslab.applications.detect import BASELINE, run_detection
    from lenslab.applications.prompts import read_choice_prompts
    from lenslab.io import atomic_write_json

    features = spec.features or ("both" if lenses.lens else "logit")
    if features != "logit" and not lenses.lens:
        raise LensLabError(f"--features {features} needs a tuned lens; pass --lens DIR or --features logit.")
    # The output path is checked and the prompt files are read first: a bad one fails before the model loads.
    check_output(spec.output, "--output", (".json",), "detect")
    normal = read_choice_prompts(spec.normal, "--normal")
    test = read_choice_prompts(spec.test, "--test")
    loaded = model.load()
    view = ModelView.from_model(loaded.model)
    chosen = {name: lens for name, lens in lenses.pair(view).items() if features in ("both", name)}
    with console.Console(stderr=True).status("scoring prompts"):
        report = run_detection(
            view, loaded.tokenizer, chosen, normal, test, seed=spec.seed, resamples=spec.resamples,
            batch_size=spec.batch_size,
        )  # fmt: skip
    print_report(report)
    record = {"model": model.model, "lens_path": str(lenses.lens[0]) if lenses.lens else None}
    record |= {"normal": str(spec.normal), "test": str(spec.test)}
    atomic_write_json(spec.output, report.to_json() | record | mark("detect"))
    best = max((name for name in report.detectors if name != BASELINE), key=lambda name: report.detectors[name].auroc)
    score, baseline = report.detectors[best], report.detectors[BASELINE]
    console.conclude([spec.output], (
        f"the best detector is {best}: AUROC {score.auroc:.3f} (95% CI {score.ci95[0]:.3f} to {score.ci95[1]:.3f})",
        f"it {'beats' if score.auroc > baseline.auroc else 'does not beat'} the Mahalanobis baseline on the final "
        f"residual, AUROC {baseline.auroc:.3f}",
    ))  # fmt: skip


def print_report(report: DetectionReport) -> None:
    """One row per detector: AUROC and its bootstrap 95% interval."""
    table = Table(title="Anomaly detection AUROC")
    for column, justify in (("features", "left"), ("detector", "left"), ("AUROC", "right"), ("95% CI", "right")):
        table.add_column(column, justify=justify)
    for name, score in report.detectors.items():
        features, detector = name.split("/", 1)
        table.add_row(features, detector, f"{score.auroc:.3f}", f"[{score.ci95[0]:.3f}, {score.ci95[1]:.3f}]")
    console.print_table(table, [
        f"fitted on {report.n_normal} normal prompts",
        f"tested on {report.n_test_normal} normal and {report.n_test_anomalous} anomalous",
        f"95% CI from {report.bootstrap['resamples']} stratified bootstrap resamples",
    ])  # fmt: skip


def run_make_attacks(config: AttackConfig, files: AttackFiles) -> None:
    from lenslab.applications.attacks import make_attacks
    from lenslab.applications.prompts import read_choice_prompts, write_choice_prompts

    check_output(files.output, "--output", (".jsonl",), "make-attacks")
    records = make_attacks(read_choice_prompts(files.input, "--input"), config)
    write_choice_prompts(files.output, records)
    attacked = sum(record.label == "anomalous" for record in records)
    console.conclude([files.output], (
        f"{attacked} of {len(records)} records are attacked ({config.kind}) and labelled anomalous",
        f"the other {len(records) - attacked} are labelled normal; pass the file to lenslab detect --test",
    ))  # fmt: skip


FILE = {"metavar": "FILE.jsonl"}
COMMANDS = [
    Command(
        "detect", "detect attacked prompts from the trajectories of multiple-choice predictions",
        "Fit anomaly detectors on the layer-by-layer choice probabilities of normal multiple-choice prompts and "
        "report their AUROC on a labelled test set, beside a Mahalanobis baseline on the final residual. `lenslab "
        "make-attacks` builds a labelled test set from any multiple-choice file.",
        (
            MODEL, LENSES,
            Spec("lenslab.specs:DetectSpec", "detection", flags={
                "normal": FILE, "test": FILE, "output": {"names": ("--output", "-o"), "metavar": "FILE.json"},
                "resamples": {"type": positive_int, "metavar": "N"},
                "batch_size": {"type": positive_int, "metavar": "N"},
            }),
        ),
        run,
    ),
    Command(
        "make-attacks", "build a labelled test set for `lenslab detect` by attacking part of a multiple-choice JSONL",
        "Attack a share of the records of a multiple-choice JSONL ({'prompt', 'choices', 'answer'} per line) and "
        "label every record normal or anomalous. injection: an instruction to answer a wrong choice before the "
        "prompt's last line. fewshot: demonstrations from other records, answered correctly for normal records and "
        "wrongly for attacked ones. --fraction 0 builds a normal set of the same layout.",
        (
            Spec("lenslab.applications.attacks:AttackConfig"),
            Spec("lenslab.specs:AttackFiles", flags={"input": FILE, "output": {"names": ("--output", "-o"), **FILE}}),
        ),
        run_make_attacks,
    ),
]  # fmt: skip
