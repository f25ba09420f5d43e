"""`lenslab cbe`: causal basis extraction, causal fidelity and stimulus–response alignment, layer by layer.

    lenslab cbe --model gpt2 --lens lenses/gpt2 --data text.txt --layers all --k 8 --tokens 4096 --output cbe/

Writes into the output directory, after everything is computed and each file atomically:

- ``bases.safetensors``: per layer ``layer.<l>`` [k, d_model] (rows = directions, most influential first), with
  ``influence.<l>``, ``mean.<l>`` (and ``partner.<l>`` for resample ablation) to reproduce the ablations;
- ``summary.json``: `CausalReport.to_json()` (influences in nats; ``seconds`` is the extraction's wall time) plus
  provenance;
- ``fidelity.png``: lens influence against model influence per layer.

Without ``--lens`` the logit lens is analysed. The sample is the first ``--tokens`` held-out tokens of the data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from lenslab.cli import console
from lenslab.cli.flags import LENSES, MODEL, TEXT, Command, Spec
from lenslab.cli.outputs import check_output, mark
from lenslab.specs import positive_int

if TYPE_CHECKING:
    from lenslab.causal import ExtractionConfig
    from lenslab.causal.report import CausalReport
    from lenslab.specs import CausalSpec, LensSpec, ModelSpec, TextSpec

SEQ_LEN = 256
"""Longest sequence when `--seq-len` is not given: many short sequences give resample ablation many partners and the
sample more documents."""
BATCH_TOKENS = 2**13
"""Tokens per model forward when `--batch-size` is not given."""
BASES_FILE, SUMMARY_FILE, FIDELITY_FILE = "bases.safetensors", "summary.json", "fidelity.png"


def run(model: ModelSpec, lenses: LensSpec, text: TextSpec, config: ExtractionConfig, spec: CausalSpec) -> None:
    # Imported here so that `lenslab --help` does not pay for torch and transformers.
    from lenslab.adapter import ModelView
    from lenslab.causal import save_bases
    from lenslab.causal.report import causal_report, parse_layers
    from lenslab.io import atomic_write_json
    from lenslab.plots.causal import plot_fidelity

    paths = [spec.output / name for name in (BASES_FILE, SUMMARY_FILE, FIDELITY_FILE)]
    for path in paths:
        check_output(path, "--output", (path.suffix,), "cbe")
    loaded = model.load()
    view = ModelView.from_model(loaded.model)
    lens = lenses.one(view)
    layers = parse_layers(spec.layers, view.num_layers)
    data = text.tokens(loaded, heldout=spec.tokens, seq_len=text.chunk_length(loaded, longest=SEQ_LEN))
    batch_size = spec.batch_size or max(1, BATCH_TOKENS // data.seq_len)
    with console.stages() as stage:
        report = causal_report(view, lens, data.heldout, layers, config, batch_size=batch_size, stage=stage)
    lens_name = f"tuned lens {lenses.lens[0]}" if lenses.lens else "logit lens"
    save_bases(paths[0], report.bases)
    provenance = {"model": model.model, "lens": str(lenses.lens[0]) if lenses.lens else "logit"}
    provenance |= {"seq_len": data.seq_len, "data": data.source, "seed": config.seed}
    atomic_write_json(paths[1], report.to_json() | provenance | mark("cbe"))
    plot_fidelity(report.fidelities, report.alignments, paths[2], model=model.model, lens_kind=lens.kind)
    print_table(report, lens_name)
    console.conclude(paths, reading(report))


def print_table(report: CausalReport, lens_name: str) -> None:
    config = report.config
    table = Table(title=f"Causal bases of the {console.shorten(lens_name, 30)} ({config.method}, {config.ablation})")
    for column in ("layer", "lens σ", "model σ", "spearman", "alignment", "seconds"):
        table.add_column(column, justify="right")
    for basis, fidelity, alignment in zip(report.bases, report.fidelities, report.alignments):
        rho, aligned = fidelity.spearman, alignment.similarity
        table.add_row(
            str(basis.layer), f"{sum(fidelity.lens_influence):.4f}", f"{sum(fidelity.model_influence):.4f}",
            "n/a" if rho is None else f"{rho:.3f}", "n/a" if aligned != aligned else f"{aligned:.3f}",
            f"{basis.seconds:.1f}",
        )  # fmt: skip
    console.print_table(table, ["σ: total influence of the k directions, in nats", "ablation by " + config.ablation])


def reading(report: CausalReport) -> tuple[str, str]:
    """Where lens and model rank the directions alike, and where the lens's stimuli best predict the model's
    responses."""
    rhos = {f.layer: f.spearman for f in report.fidelities if f.spearman is not None}
    alike = [layer for layer, rho in rhos.items() if rho >= 0.5]
    first = f"lens and model rank the directions alike (Spearman ≥ 0.5) at {len(alike)} of {len(report.fidelities)}"
    first += f" layers; least alike at layer {min(rhos, key=rhos.get)}" if rhos else " layers"
    aligned = {a.layer: a.similarity for a in report.alignments if a.similarity == a.similarity}
    if not aligned:
        return first, "stimulus-response alignment is undefined at every layer: no ablation changed a token"
    best, worst = max(aligned, key=aligned.get), min(aligned, key=aligned.get)
    return first, (
        f"stimulus-response alignment is highest at layer {best} ({aligned[best]:.3f}) and lowest at layer {worst} "
        f"({aligned[worst]:.3f})"
    )


COMMANDS = [
    Command(
        "cbe", "causal basis extraction: the directions a lens depends on, and whether the model does too",
        "Find the k most influential orthonormal directions of the residual stream for a lens at each layer (causal "
        "basis extraction), ablate each in the model to measure its influence there (causal fidelity, Spearman rho), "
        f"and measure stimulus-response alignment. Writes {BASES_FILE}, {SUMMARY_FILE} and {FIDELITY_FILE} into "
        f"--output. --seq-len defaults to at most {SEQ_LEN} here.",
        (
            MODEL, LENSES, TEXT,
            Spec("lenslab.causal.basis:ExtractionConfig", "extraction", only=("k", "method", "ablation", "seed")),
            Spec("lenslab.specs:CausalSpec", "sample and output", flags={
                "output": {"names": ("--output", "-o"), "metavar": "DIR"}, "layers": {"metavar": "all|L1,L2,..."},
                "tokens": {"type": positive_int, "metavar": "N"}, "batch_size": {"type": positive_int, "metavar": "N"},
            }),
        ),
        run,
    )
]  # fmt: skip
