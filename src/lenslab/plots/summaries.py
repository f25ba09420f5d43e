"""Each command's result in words: a rich table within 80 columns (`lenslab.report.WIDTH`) with short footnotes,
and a two-line reading of what it means, e.g. "the tuned lens is closer to the model than the logit lens at every
layer; largest gap at layer 0".

>>> shorten("/models/austen-gpt2-6l-lens-final", 12)
'auste…-final'
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from lenslab.plots.depth import depth_table
from lenslab.plots.palette import kind_color, lens_label
from lenslab.report import Report

if TYPE_CHECKING:
    from lenslab.applications.depth import DepthResult
    from lenslab.applications.detect import DetectionReport
    from lenslab.causal.report import CausalReport
    from lenslab.evaluate import EvalResult
    from lenslab.trajectory import Trajectory


def shorten(name: str, width: int = 12) -> str:
    """A lens or model name that fits a column: a path's last part, its middle cut to `width` characters."""
    name = Path(name).name or name
    return name if len(name) <= width else f"{name[: (width - 1) // 2]}…{name[-(width // 2) :]}"


def eval_summary(result: EvalResult, written: list[Path], *, units: str = "bits-per-byte") -> Report:
    """Three layers x lenses tables, so that they fit 80 columns with up to five lenses: KL to the model,
    cross-entropy (both in `units`) and top-1 agreement, each lens headed by its shortened name in its kind's
    colour; the footnotes give the model's own CE in both units."""
    factor = result.unit_factor(units)
    unit = "bpb" if units == "bits-per-byte" else "nats"
    metrics = {
        f"KL to the model ({unit})": lambda m: [f"{value * factor:.3f}" for value in m.kl],
        f"cross-entropy ({unit})": lambda m: [f"{value * factor:.3f}" for value in m.ce],
        "top-1 agreement with the model": lambda m: [f"{share:.1%}" for share in m.top1_agreement],
    }
    tables = []
    for title, cells in metrics.items():
        first = not tables
        table = Table(
            title=f"{shorten(result.model, 30)}, {result.tokens:,} held-out tokens: {title}" if first else title
        )
        table.add_column("layer")
        for name in result.lenses:
            table.add_column(Text(shorten(name, 10), style=kind_color(result.kinds.get(name, name))), justify="right")
        for layer, *row in zip(result.layers, *(cells(m) for m in result.lenses.values())):
            table.add_row(layer, *row)
        tables.append(table)
    notes = [f"model CE {result.final_ce:.3f} nats/token", f"entropy {result.final_entropy:.3f} nats/token"]
    if result.nats_to_bits_per_byte is not None:
        notes += [
            f"CE {result.final_ce * result.nats_to_bits_per_byte:.3f} bits/byte",
            f"1 nat/token = {result.nats_to_bits_per_byte:.3f} bits/byte",
        ]
    return Report(_eval_reading(result), written, tables, notes)


def _eval_reading(result: EvalResult) -> tuple[str, str]:
    """How the trained lenses compare with the logit lens (KL to the model), and where each first agrees with the
    model's top-1 on most tokens."""
    layers = result.layers[:-1]  # at the last position every lens is the model itself
    logit = result.lenses["logit"].kl
    parts = []
    for name in (name for name in result.lenses if name != "logit"):
        gaps = [base - kl for base, kl in zip(logit, result.lenses[name].kl)][: len(layers)]
        closer = sum(gap > 0 for gap in gaps)
        where = "every layer" if closer == len(gaps) else f"{closer} of {len(gaps)} layers"
        largest = layers[max(range(len(gaps)), key=lambda i: abs(gaps[i]))]
        label = lens_label(name, result.kinds.get(name, name))
        parts.append(f"the {label} is closer to the model than the logit lens at {where}; largest gap at {largest}")
    first = "; ".join(parts) or (
        f"the logit lens's KL to the model falls from {logit[0]:.3f} nats at {layers[0]} to {logit[-2]:.3f} at "
        f"{layers[-1]}"
    )
    majority = []
    for name, metrics in result.lenses.items():
        agree = next((layer for layer, share in zip(result.layers, metrics.top1_agreement) if share > 0.5), None)
        majority.append(f"{name} from {agree}" if agree else f"{name} nowhere before the output")
    return first, "top-1 agrees with the model on most tokens: " + ", ".join(majority)


def show_reading(trajectories: Sequence[Trajectory]) -> tuple[str, str]:
    """Where each lens first predicts the model's next token at the last token shown, and how sure the layers
    are there."""
    first = trajectories[0]
    predicted = int(first.top_k_ids[-1, -1, 0])
    settled = []
    for trajectory in trajectories:
        tops = trajectory.top_k_ids[:, -1, 0].tolist()
        layer = next(p for p in range(len(tops)) if all(top == predicted for top in tops[p:]))
        settled.append(f"the {lens_label(trajectory.lens_name, trajectory.lens_kind)} from {trajectory.layers[layer]}")
    entropy = first.entropy[:, -1]
    return (
        f"at the last token the model predicts {first.token_text[predicted]!r}; it is the top prediction of "
        + " and ".join(settled),
        f"entropy there falls from {entropy[0]:.2f} nats at {first.layers[0]} to {entropy[-1]:.2f} at the output",
    )


def detect_summary(report: DetectionReport, written: list[Path]) -> Report:
    """One row per detector: AUROC and its bootstrap 95% interval; the reading names the best against the
    baseline."""
    from lenslab.applications.detect import BASELINE  # here, so that only `lenslab detect` loads scikit-learn

    table = Table(title="Anomaly detection AUROC")
    for column, justify in (("features", "left"), ("detector", "left"), ("AUROC", "right"), ("95% CI", "right")):
        table.add_column(column, justify=justify)
    for name, score in report.detectors.items():
        features, detector = name.split("/", 1)
        table.add_row(features, detector, f"{score.auroc:.3f}", f"[{score.ci95[0]:.3f}, {score.ci95[1]:.3f}]")
    notes = [
        f"fitted on {report.n_normal} normal prompts",
        f"tested on {report.n_test_normal} normal and {report.n_test_anomalous} anomalous",
        f"95% CI from {report.bootstrap['resamples']} stratified bootstrap resamples",
    ]
    best = max((name for name in report.detectors if name != BASELINE), key=lambda name: report.detectors[name].auroc)
    score, baseline = report.detectors[best], report.detectors[BASELINE]
    reading = (
        f"the best detector is {best}: AUROC {score.auroc:.3f} (95% CI {score.ci95[0]:.3f} to {score.ci95[1]:.3f})",
        f"it {'beats' if score.auroc > baseline.auroc else 'does not beat'} the Mahalanobis baseline on the final "
        f"residual, AUROC {baseline.auroc:.3f}",
    )
    return Report(reading, written, [table], notes)


def depth_summary(result: DepthResult, written: list[Path], *, lens_kind: str) -> Report:
    """The depth table (`lenslab.plots.depth.depth_table`); the reading gives the typical depth, and how depth goes
    with loss (and with training order)."""
    depths = result.depths.flatten().float()
    first = (
        f"through the {lens_kind} lens the median token's prediction settles at depth {depths.median():.0f} of "
        f"{result.num_layers} (mean {depths.mean():.2f})"
    )
    rho = result.spearman_depth_loss
    second = (
        "depth and loss are uncorrelated (a constant)"
        if rho != rho
        else f"tokens settled deeper have {'higher' if rho > 0 else 'lower'} loss (Spearman {rho:.2f})"
    )
    if result.spearman_depth_learned is not None and result.spearman_depth_learned == result.spearman_depth_learned:
        second += f"; depth against learning checkpoint: Spearman {result.spearman_depth_learned:.2f}"
    return Report((first, second), written, [depth_table(result, lens_kind=lens_kind)])


def causal_summary(report: CausalReport, written: list[Path], *, lens_name: str) -> Report:
    """Per layer the total influence of the k directions on the lens and on the model, their rank correlation, the
    stimulus-response alignment and the seconds taken; the reading says where lens and model agree."""
    config = report.config
    table = Table(title=f"Causal bases of the {shorten(lens_name, 30)} ({config.method}, {config.ablation})")
    for column in ("layer", "lens σ", "model σ", "spearman", "alignment", "seconds"):
        table.add_column(column, justify="right")
    for basis, fidelity, alignment in zip(report.bases, report.fidelities, report.alignments):
        rho, aligned = fidelity.spearman, alignment.similarity
        table.add_row(
            str(basis.layer), f"{sum(fidelity.lens_influence):.4f}", f"{sum(fidelity.model_influence):.4f}",
            "n/a" if rho is None else f"{rho:.3f}", "n/a" if aligned != aligned else f"{aligned:.3f}",
            f"{basis.seconds:.1f}",
        )  # fmt: skip
    notes = ["σ: total influence of the k directions, in nats", "ablation by " + config.ablation]
    rhos = {f.layer: f.spearman for f in report.fidelities if f.spearman is not None}
    alike = [layer for layer, rho in rhos.items() if rho >= 0.5]
    first = f"lens and model rank the directions alike (Spearman ≥ 0.5) at {len(alike)} of {len(report.fidelities)}"
    first += f" layers; least alike at layer {min(rhos, key=rhos.get)}" if rhos else " layers"
    aligned = {a.layer: a.similarity for a in report.alignments if a.similarity == a.similarity}
    if not aligned:
        second = "stimulus-response alignment is undefined at every layer: no ablation changed a token"
    else:
        best, worst = max(aligned, key=aligned.get), min(aligned, key=aligned.get)
        second = (
            f"stimulus-response alignment is highest at layer {best} ({aligned[best]:.3f}) and lowest at layer "
            f"{worst} ({aligned[worst]:.3f})"
        )
    return Report((first, second), written, [table], notes)
