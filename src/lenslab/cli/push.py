"""`lenslab push`: publish a lens on the Hugging Face Hub as a model repository with a model card.

    lenslab push --lens runs/gpt2-lens --repo me/gpt2-tuned-lens --eval runs/gpt2-eval.json
    lenslab push --lens runs/gpt2-lens --repo me/gpt2-tuned-lens --dry-run --output to-upload/

Uploads `config.json`, `params.safetensors` and `README.md` (`lenslab.publish.push_lens`), which `--lens
hf://OWNER/NAME` then loads; `--dry-run` writes them into `--output` instead and uploads nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lenslab.cli import console
from lenslab.cli.flags import Command, Spec

if TYPE_CHECKING:
    from lenslab.command_specs import PushSpec


def run(spec: PushSpec) -> None:
    from lenslab.publish import push_lens  # imported here so that `lenslab --help` does not pay for torch

    published = push_lens(
        spec.lens, spec.repo, evaluation=spec.evaluation, base_model=spec.base_model, private=spec.private,
        dry_run=spec.output if spec.dry_run else None,
    )  # fmt: skip
    files = ", ".join(published.files)
    if published.url is None:
        reading = (f"dry run: nothing was uploaded to {spec.repo}", f"an upload would send {files}")
    else:
        reading = (f"uploaded {files} to {spec.repo}: {published.url}", f"load it with --lens hf://{spec.repo}")
    console.conclude(published.written, reading)


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
        run,
    )
]  # fmt: skip
