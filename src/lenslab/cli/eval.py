"""`lenslab eval`: score the logit lens and trained lenses at every layer on held-out text.

    lenslab eval --model gpt2 --lens lenses/gpt2 --data text.txt --tokens 65536 --output eval.json

Writes the metrics as JSON (`EvalResult.to_json()` plus the data's provenance), a PNG of the per-layer curves
next to it (or at `--plot`), with `--transfer` a heatmap of every translator at every layer, and prints a table.
The output paths are checked before the model loads (`lenslab.cli.outputs`), everything is computed before anything
is written, and every file is written atomically, so a failed run leaves earlier outputs as they were. A trained
lens is not scored on more of its training text than its training held out (`lenslab.scoring.check_heldout`).
`lenslab transfer` reports the same way (`report`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from lenslab.cli import console
from lenslab.cli.flags import LENSES, MODEL, TEXT, Command, Spec
from lenslab.cli.outputs import check_output, mark
from lenslab.errors import LensLabError
from lenslab.specs import positive_int

if TYPE_CHECKING:
    from lenslab.adapter import ModelView
    from lenslab.evaluate import EvalResult
    from lenslab.lenses import Lens
    from lenslab.loading import LoadedModel
    from lenslab.specs import EvalSpec, LensSpec, ModelSpec, TextSpec

SCORING = {
    "output": {"names": ("--output", "-o"), "metavar": "FILE.json"},
    "plot": {"metavar": "PATH"},
    "tokens": {"names": ("--tokens", "--heldout-tokens"), "type": positive_int, "metavar": "N"},
    "batch_size": {"type": positive_int, "metavar": "N"},
}
"""How the scoring flags, shared with `lenslab transfer`, read (`--heldout-tokens` is `lenslab train`'s name)."""


def run(model: ModelSpec, lenses: LensSpec, text: TextSpec, spec: EvalSpec) -> None:
    from lenslab.adapter import ModelView  # imported here so that `lenslab --help` does not pay for torch

    if spec.transfer and not lenses.lens:
        raise LensLabError("--transfer needs a trained lens to apply at other layers; pass --lens DIR.")
    check_outputs("eval", spec)
    loaded = model.load()
    view = ModelView.from_model(loaded.model)
    # Lenses load before the data is read, so a lens for another model fails at once.
    loaded_lenses = lenses.load(view)
    transfer = [name for name in loaded_lenses if name != "logit"] if spec.transfer else []
    paths = {name: str(directory) for name, directory in lenses.names().items()}
    report("eval", loaded, view, loaded_lenses, text, spec, transfer=transfer, record={"lens_paths": paths})


def check_outputs(command: str, spec: EvalSpec) -> None:
    """Refuse, before the model loads, an `--output` or `--plot` that `report` cannot or must not write."""
    check_output(spec.output, "--output", (".json",), command)
    for path in [spec.plot_path, spec.transfer_path] if spec.transfer else [spec.plot_path]:
        check_output(path, "--plot", (".png",), command)


def report(
    command: str, loaded: LoadedModel, view: ModelView, lenses: dict[str, Lens], text: TextSpec, spec: EvalSpec,
    *, transfer: list[str], record: dict,
) -> None:  # fmt: skip
    """Score `lenses` (`lenslab.scoring.score_heldout`); print the table and reading, write PNG(s) and JSON, with
    `record` merged into it. Nothing is written until everything is computed."""
    from lenslab.io import atomic_write_json
    from lenslab.plots import plot_curves, plot_transfer
    from lenslab.scoring import score_heldout

    with console.stages() as stage:
        scores = score_heldout(
            loaded, view, lenses, text, tokens=spec.tokens, batch_size=spec.batch_size, transfer=transfer, stage=stage
        )
    result = scores.result
    print_table(result, units=spec.units)
    written = [plot_curves(result, spec.plot_path, units=spec.units)]
    if transfer:
        written.append(plot_transfer(result, spec.transfer_path, units=spec.units))
    provenance = {"data": scores.source, "seq_len": scores.seq_len}
    atomic_write_json(spec.output, result.to_json() | provenance | record | mark(command))
    console.conclude([spec.output, *written], reading(result))


def print_table(result: EvalResult, *, units: str = "bits-per-byte") -> None:
    """A layers x lenses table of cross-entropy, KL to the model and top-1 agreement, CE and KL in `units`; the
    footnotes give the model's own CE in both units."""
    factor = result.unit_factor(units)
    unit = "bpb" if units == "bits-per-byte" else "nats"
    table = Table(title=f"{console.shorten(result.model, 30)}: {result.tokens:,} held-out tokens")
    table.add_column("layer")
    for name in result.lenses:
        label = console.shorten(name, 10)
        for metric in (f"CE ({unit})", f"KL ({unit})", "top-1"):
            table.add_column(f"{label}\n{metric}", justify="right")
    for position, layer in enumerate(result.layers):
        cells = [layer]
        for metrics in result.lenses.values():
            cells += [
                f"{metrics.ce[position] * factor:.3f}",
                f"{metrics.kl[position] * factor:.3f}",
                f"{metrics.top1_agreement[position]:.1%}",
            ]
        table.add_row(*cells)
    notes = [f"model CE {result.final_ce:.3f} nats/token", f"entropy {result.final_entropy:.3f} nats/token"]
    if result.nats_to_bits_per_byte is not None:
        notes += [
            f"CE {result.final_ce * result.nats_to_bits_per_byte:.3f} bits/byte",
            f"1 nat/token = {result.nats_to_bits_per_byte:.3f} bits/byte",
        ]
    console.print_table(table, notes)


def reading(result: EvalResult) -> tuple[str, str]:
    """How the trained lenses compare with the logit lens (KL to the model), and where each first agrees with the
    model's top-1 on most tokens."""
    layers = result.layers[:-1]  # at the last position every lens is the model itself
    logit = result.lenses["logit"].kl
    trained = [name for name in result.lenses if name != "logit"]
    if trained:
        parts = []
        for name in trained:
            gaps = [base - kl for base, kl in zip(logit, result.lenses[name].kl)][: len(layers)]
            closer = sum(gap > 0 for gap in gaps)
            where = "every layer" if closer == len(gaps) else f"{closer} of {len(gaps)} layers"
            largest = layers[max(range(len(gaps)), key=lambda i: abs(gaps[i]))]
            parts.append(
                f"the {name} lens is closer to the model than the logit lens at {where}; largest gap at {largest}"
            )
        first = "; ".join(parts)
    else:
        first = (
            f"the logit lens's KL to the model falls from {logit[0]:.3f} nats at {layers[0]} to {logit[-2]:.3f} at "
            f"{layers[-1]}"
        )
    majority = []
    for name, metrics in result.lenses.items():
        agree = next((layer for layer, share in zip(result.layers, metrics.top1_agreement) if share > 0.5), None)
        majority.append(f"{name} from {agree}" if agree else f"{name} nowhere before the output")
    return first, "top-1 agrees with the model on most tokens: " + ", ".join(majority)


COMMANDS = [
    Command(
        "eval", "score lenses layer by layer on held-out text",
        "Score the logit lens and any trained lenses at every layer on held-out text: cross-entropy, KL to the "
        "model's prediction, entropy, top-1 agreement and marginal bias, as JSON, a table and a PNG.",
        (MODEL, LENSES, TEXT, Spec("lenslab.specs:EvalSpec", "scoring and output", flags=SCORING)), run,
    )
]  # fmt: skip
