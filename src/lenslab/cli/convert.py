"""`lenslab convert`: a lens from one layout into another, for the tools that read it.

    lenslab convert --lens runs/gpt2-jacobian --to jacobian-lens --output gpt2-jlens.pt
    lenslab convert --lens gpt2-jlens.pt --to tuned-lens --output gpt2-jlens-tuned
    lenslab convert --lens tuned-lens/gpt2 --to lenslab --output runs/gpt2-tuned --model gpt2

What converts exactly, what is refused and what is left out is `lenslab.convert`'s docstring.
"""

from __future__ import annotations

from lenslab.cli.flags import Command, Spec

COMMANDS = [
    Command(
        "convert", "convert a lens between lenslab, Jacobian-lens and tuned-lens files",
        "Convert a lens between a lenslab folder (any kind), the Jacobian-lens .pt of TransformerLens and "
        "anthropics/jacobian-lens, and the tuned-lens package's folder. J-lens block l is lenslab's position l+1, "
        "and a tuned lens h + A h + b is J = I + A there. A lens with a bias cannot become a J-lens file (refused), "
        "nor can a translator at the embeddings (dropped, with a warning); a lens without bias gets zero biases in "
        "the tuned-lens layout. --model is optional: it checks the lens against the model and records the model's "
        "fingerprint.",
        (
            Spec("lenslab.command_specs:ConvertSpec", flags={
                "lens": {"metavar": "LENS"}, "output": {"names": ("--output", "-o"), "metavar": "PATH"},
            }),
        ),
        "lenslab.runs:convert",
    )
]  # fmt: skip
