"""`lenslab show`: what every layer predicts at every token of a prompt, as a picture, JSON or a table.

    lenslab show --model gpt2 --lens lenses/gpt2 --stat entropy --output out.html "The capital of France is"

The output format follows the extension of ``--output``: ``.html`` (interactive, plotly, works offline),
``.png`` (matplotlib) or ``.json`` (``lenslab.trajectory.trajectories_to_dict``: one trajectory object for
the logit lens alone, ``{"lenses": {"logit": {...}, "tuned": {...}}}`` with ``--lens``). Without
``--output`` a coloured table is printed to the terminal. Everything is computed before anything is
written, and files are written atomically.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from rich.console import Console

from lenslab.cli import console
from lenslab.cli.flags import LENSES, MODEL, Command, Spec
from lenslab.cli.outputs import check_output, mark
from lenslab.errors import LensLabError
from lenslab.specs import positions, positive_int

if TYPE_CHECKING:
    from lenslab.specs import LensSpec, ModelSpec, ShowSpec
    from lenslab.trajectory import Trajectory, TrajectoryConfig

FORMATS = (".html", ".png", ".json")
"""Output formats, chosen by the extension of ``--output``."""


def run(model: ModelSpec, lenses: LensSpec, config: TrajectoryConfig, spec: ShowSpec) -> None:
    # Imported here so that `lenslab --help` does not pay for torch, transformers, plotly and matplotlib.
    from lenslab.adapter import ModelView
    from lenslab.io import atomic_write_json
    from lenslab.tokens import single_token_id
    from lenslab.trajectory import EMPTY_PROMPT, compute_trajectories, encode_prompt, trajectories_to_dict

    text = spec.text()
    if not text:  # found before the model loads, which can take minutes
        raise LensLabError(EMPTY_PROMPT)
    if spec.output is not None:
        check_output(spec.output, "--output", FORMATS, "show")
    if spec.stat == "target" and not spec.target:
        raise LensLabError(
            "--stat target shows the target's log-probability, but no target was given; pass --target TOKEN."
        )
    loaded = model.load()
    view = ModelView.from_model(loaded.model)
    config = replace(
        config,
        targets=tuple(single_token_id(loaded.tokenizer, target, "--target") for target in spec.target),
        anti_targets=tuple(single_token_id(loaded.tokenizer, anti, "--anti-target") for anti in spec.anti_target),
    )
    ids = encode_prompt(loaded.tokenizer, text)
    lens_list = list(lenses.pair(view).values())
    trajectories = compute_trajectories(view, lens_list, ids, tokenizer=loaded.tokenizer, config=config)

    suffix = spec.output.suffix.lower() if spec.output else None
    if suffix is None:
        from lenslab.plots.terminal import tables

        terminal = Console()
        for table in tables(trajectories, spec.stat, width=terminal.width):
            terminal.print(table)
    elif suffix == ".html":
        from lenslab.plots.html import write_html

        write_html(trajectories, spec.output, spec.stat)
    elif suffix == ".png":
        from lenslab.plots.png import write_png

        write_png(trajectories, spec.output, spec.stat)
    else:
        atomic_write_json(spec.output, trajectories_to_dict(trajectories) | mark("show"))
    console.conclude([spec.output] if spec.output else [], reading(trajectories))


def reading(trajectories: list[Trajectory]) -> tuple[str, str]:
    """Where each lens first predicts the model's next token at the last token shown, and how sure the layers
    are there."""
    first = trajectories[0]
    predicted = int(first.top_k_ids[-1, -1, 0])
    settled = []
    for trajectory in trajectories:
        tops = trajectory.top_k_ids[:, -1, 0].tolist()
        layer = next(p for p in range(len(tops)) if all(top == predicted for top in tops[p:]))
        settled.append(f"the {trajectory.lens_name} lens from {trajectory.layers[layer]}")
    entropy = first.entropy[:, -1]
    return (
        f"at the last token the model predicts {first.token_text[predicted]!r}; it is the top prediction of "
        + " and ".join(settled),
        f"entropy there falls from {entropy[0]:.2f} nats at {first.layers[0]} to {entropy[-1]:.2f} at the output",
    )


COMMANDS = [
    Command(
        "show", "picture what every layer predicts at every token of a prompt",
        "Show the top predictions of every layer at every token of a prompt through the logit lens (and a tuned "
        "lens with --lens): an interactive HTML heatmap, a PNG, JSON, or a table in the terminal.",
        (
            MODEL, LENSES,
            Spec("lenslab.trajectory:TrajectoryConfig", "trajectory", only=("top_k", "positions"), flags={
                "top_k": {"type": positive_int, "metavar": "K"},
                "positions": {"type": positions, "metavar": "START:END"},
            }),
            Spec("lenslab.specs:ShowSpec", "prompt and output", flags={
                "prompt": {"positional": True}, "prompt_file": {"metavar": "FILE"},
                "target": {"metavar": "TOKEN"}, "anti_target": {"metavar": "TOKEN"},
                "output": {"names": ("--output", "-o"), "metavar": "FILE"},
            }),
        ),
        run,
    )
]  # fmt: skip
