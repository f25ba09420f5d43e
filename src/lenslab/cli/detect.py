"""`lenslab detect`: detect attacked prompts from the trajectories of multiple-choice predictions
(`lenslab.runs.detect`).

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

from lenslab.cli.eval import SCORING
from lenslab.cli.flags import LENSES, MODEL, Command, Spec
from lenslab.specs import positive_int

FILE = {"metavar": "FILE.jsonl"}
COMMANDS = [
    Command(
        "detect", "detect attacked prompts from the trajectories of multiple-choice predictions",
        "Fit anomaly detectors on the layer-by-layer choice probabilities of normal multiple-choice prompts and "
        "report their AUROC on a labelled test set, beside a Mahalanobis baseline on the final residual. `lenslab "
        "make-attacks` builds a labelled test set from any multiple-choice file.",
        (
            MODEL, LENSES,
            Spec("lenslab.command_specs:DetectSpec", "detection", flags=SCORING | {
                "normal": FILE, "test": FILE, "resamples": {"type": positive_int, "metavar": "N"},
            }),
        ),
        "lenslab.runs:detect",
    ),
    Command(
        "make-attacks", "build a labelled test set for `lenslab detect` by attacking part of a multiple-choice JSONL",
        "Attack a share of the records of a multiple-choice JSONL ({'prompt', 'choices', 'answer'} per line) and "
        "label every record normal or anomalous. injection: an instruction to answer a wrong choice before the "
        "prompt's last line. fewshot: demonstrations from other records, answered correctly for normal records and "
        "wrongly for attacked ones. --fraction 0 builds a normal set of the same layout.",
        (
            Spec("lenslab.applications.attacks:AttackConfig"),
            Spec(
                "lenslab.command_specs:AttackFiles",
                flags={"input": FILE, "output": {"names": ("--output", "-o"), **FILE}},
            ),
        ),
        "lenslab.runs:make_attacks",
    ),
]  # fmt: skip
