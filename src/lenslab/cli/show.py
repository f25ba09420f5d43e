"""`lenslab show`: what every layer predicts at every token of a prompt, through the logit lens and any number of
trained lenses side by side, as a picture, JSON or a table (`lenslab.runs.show`).

    lenslab show --model gpt2 --lens lenses/gpt2 --lens lenses/gpt2-jacobian --stat entropy -o out.html "The capital"

The format follows the extension of ``--output``: ``.html`` (interactive, plotly, works offline), ``.png``
(matplotlib, a page wide) or ``.json`` (`lenslab.trajectory_json`: one trajectory object for the logit lens
alone, ``{"lenses": {"logit": {...}, "tuned": {...}, ...}}`` with ``--lens``); without ``--output``, coloured
tables in the terminal. Each lens is one block, named by its kind (by its folder when two share a kind) and
coloured by its kind.
"""

from __future__ import annotations

from lenslab.cli.flags import LENSES, MODEL, Command, Spec
from lenslab.specs import positions, positive_int

COMMANDS = [
    Command(
        "show", "picture what every layer predicts at every token of a prompt",
        "Show the top predictions of every layer at every token of a prompt through the logit lens and every "
        "--lens beside it: an interactive HTML heatmap, a PNG, JSON, or a table in the terminal.",
        (
            MODEL, LENSES,
            Spec("lenslab.trajectory:TrajectoryConfig", "trajectory", only=("top_k", "positions"), flags={
                "top_k": {"type": positive_int, "metavar": "K"},
                "positions": {"type": positions, "metavar": "START:END"},
            }),
            Spec("lenslab.command_specs:ShowSpec", "prompt and output", flags={
                "prompt": {"positional": True}, "prompt_file": {"metavar": "FILE"},
                "target": {"metavar": "TOKEN"}, "anti_target": {"metavar": "TOKEN"},
                "output": {"names": ("--output", "-o"), "metavar": "FILE"},
            }),
        ),
        "lenslab.runs:show",
    )
]  # fmt: skip
