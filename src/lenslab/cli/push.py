"""`lenslab push`: publish a lens on the Hugging Face Hub as a model repository with a model card.

    lenslab push --lens runs/gpt2-lens --repo me/gpt2-tuned-lens --eval runs/gpt2-eval.json
    lenslab push --lens runs/gpt2-lens --repo me/gpt2-tuned-lens --dry-run --output to-upload/

Uploads `config.json`, `params.safetensors` and `README.md` (`lenslab.publish.push_lens`), which `--lens
hf://OWNER/NAME` then loads; `--dry-run` writes them into `--output` instead and uploads nothing.
"""

from __future__ import annotations

from lenslab.cli.flags import Command, Spec

COMMANDS = [
    Command(
        "push", "publish a lens on the Hugging Face Hub with a model card",
        "Upload a lens folder to a hub model repository (created when missing) as config.json, params.safetensors "
        "and a generated model card (README.md: base model, tags, training data and recipe, and with --eval the "
        "per-layer table of lenslab eval); --lens hf://OWNER/NAME loads it back.",
        (
            Spec("lenslab.command_specs:PushSpec", flags={
                "lens": {"metavar": "DIR"}, "repo": {"metavar": "OWNER/NAME"},
                "evaluation": {"names": ("--eval",), "metavar": "EVAL.json"}, "base_model": {"metavar": "OWNER/NAME"},
                "output": {"names": ("--output", "-o"), "metavar": "DIR"},
            }),
        ),
        "lenslab.runs:push",
    )
]  # fmt: skip
