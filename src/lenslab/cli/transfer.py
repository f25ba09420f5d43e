"""`lenslab transfer`: score a base model's tuned lens on a fine-tuned relative of that model.

    lenslab transfer --lens lenses/base --model my-finetuned-model --data text.txt --output transfer.json
    lenslab transfer --lens lenses/base --model my-finetuned-model --own-lens lenses/finetuned --data ...

The base lens is loaded with the unembedding fingerprint check relaxed to shapes (same layers and width), and
a logged warning says so. It is scored beside the fine-tuned model's logit lens (``logit``) and, with `--own-lens`, a
tuned lens trained on the fine-tuned model itself (``own_tuned``); the base lens is ``base_tuned``. The JSON,
table and PNG are those of `lenslab eval`, plus a ``lens_transfer`` record of what was relaxed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lenslab.cli import eval as evaluation
from lenslab.cli.flags import MODEL, TEXT, Command, Spec

if TYPE_CHECKING:
    from lenslab.specs import EvalSpec, ModelSpec, TextSpec, TransferSpec


def run(model: ModelSpec, lenses: TransferSpec, text: TextSpec, spec: EvalSpec) -> None:
    from lenslab.adapter import ModelView  # imported here so that `lenslab --help` does not pay for torch
    from lenslab.applications.transfer import BASE_TUNED, OWN_TUNED, transfer_lenses

    evaluation.check_outputs("transfer", spec)
    loaded = model.load()
    view = ModelView.from_model(loaded.model)
    # Lenses load before the data is read, so a lens of the wrong shape fails at once; transfer_lenses logs a
    # warning that the fingerprint check is relaxed.
    loaded_lenses, note = transfer_lenses(view, lenses.lens, own_lens_dir=lenses.own_lens)
    paths = {BASE_TUNED: str(lenses.lens)} | ({OWN_TUNED: str(lenses.own_lens)} if lenses.own_lens else {})
    record = {"lens_paths": paths, "lens_transfer": note}
    evaluation.report("transfer", loaded, view, loaded_lenses, text, spec, transfer=[], record=record)


COMMANDS = [
    Command(
        "transfer", "score a base model's tuned lens on a fine-tuned relative",
        "Apply a tuned lens trained on a base model to a fine-tuned model of the same architecture and sizes (the "
        "fingerprint check is relaxed to shapes) and score it layer by layer beside the fine-tuned model's logit "
        "lens and, with --own-lens, its own tuned lens; output as in `lenslab eval`.",
        (
            MODEL, Spec("lenslab.specs:TransferSpec", "lenses", flags={"lens": {"metavar": "DIR"}}), TEXT,
            Spec("lenslab.specs:EvalSpec", "scoring and output", only=tuple(evaluation.SCORING) + ("units",),
                 flags=evaluation.SCORING),
        ),
        run,
    )
]  # fmt: skip
