"""Causal basis extraction, causal fidelity and stimulus–response alignment at several layers of one lens, as
`lenslab cbe` reports them: one pass captures the residuals of every layer, then each layer is analysed and its
residuals freed.

>>> report = causal_report(view, lens, input_ids, [0, 3], ExtractionConfig(k=8), batch_size=16)  # doctest: +SKIP
>>> report.to_json()["layers"]["3"]["spearman"]  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lenslab.adapter import ModelView
from lenslab.causal.alignment import Alignment, stimulus_response_alignment
from lenslab.causal.basis import CausalBasis, ExtractionConfig, check_request, extract_basis
from lenslab.causal.fidelity import Fidelity, causal_fidelity
from lenslab.causal.sample import capture_sample
from lenslab.errors import LensLabError
from lenslab.lenses import Lens
from lenslab.scoring import Stage


@dataclass
class CausalReport:
    """Per analysed layer, in order: the basis, its fidelity and the layer's stimulus–response alignment."""

    config: ExtractionConfig
    bases: list[CausalBasis]
    fidelities: list[Fidelity]
    alignments: list[Alignment]
    tokens: int
    """Tokens in the sample."""

    def to_json(self) -> dict:
        """``{"method", "ablation", "k", "tokens", "layers": {"<l>": {"lens_influence": [k], "model_influence": [k],
        "spearman", "seconds", "total_lens_influence"}}, "alignment": {"<l>": similarity or null}}``, in nats."""
        layers = {
            str(basis.layer): {
                "lens_influence": fidelity.lens_influence,
                "model_influence": fidelity.model_influence,
                "spearman": fidelity.spearman,
                "seconds": round(basis.seconds, 3),
                "total_lens_influence": sum(fidelity.lens_influence),
            }
            for basis, fidelity in zip(self.bases, self.fidelities)
        }
        # JSON has no NaN: an undefined similarity (no token changed) is written as null.
        alignment = {str(a.layer): a.similarity if a.similarity == a.similarity else None for a in self.alignments}
        config = self.config
        return {"method": config.method, "ablation": config.ablation, "k": config.k, "tokens": self.tokens} | {
            "layers": layers, "alignment": alignment,
        }  # fmt: skip


def parse_layers(text: str, num_layers: int) -> list[int]:
    """`--layers`: "all" -> 0..num_layers-1; "0,3,5" -> [0, 3, 5] (sorted, unique), each within 0..num_layers."""
    if text.strip().lower() == "all":
        return list(range(num_layers))
    try:
        layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise LensLabError(
            f"--layers {text!r} is not 'all' or a comma-separated list of integers; pass e.g. 0,3,5."
        ) from None
    bad = [layer for layer in layers if not 0 <= layer <= num_layers]
    if not layers or bad:
        raise LensLabError(
            f"--layers {text!r} names {bad or 'no'} layers outside the model's lens positions 0..{num_layers}; "
            f"pass positions in that range or 'all'."
        )
    return layers


def causal_report(
    view: ModelView,
    lens: Lens,
    input_ids: Tensor,
    layers: list[int],
    config: ExtractionConfig,
    *,
    batch_size: int = 8,
    stage: Stage | None = None,
) -> CausalReport:
    """Extract a basis of `lens` at each of `layers` from the residuals of `input_ids: [n_seq, seq]`, then measure
    its fidelity in the model and the layer's alignment."""
    for layer in layers:  # a bad k or layer fails before any forward
        check_request(lens, layer, config.k)
    n_seq = len(input_ids)
    advance = stage("capturing residuals", n_seq) if stage else None
    sample = capture_sample(view, input_ids, layers, batch_size=batch_size, progress=advance)
    report = CausalReport(config, [], [], [], int(input_ids.numel()))
    for layer in layers:
        steps = config.k if config.method == "reference" else config.fast.steps
        advance = stage(f"layer {layer}: basis, fidelity, alignment", steps + 2 * n_seq) if stage else None
        basis = extract_basis(lens, sample[layer], layer, config, progress=advance and (lambda _: advance(1)))
        report.bases.append(basis)
        report.fidelities.append(
            causal_fidelity(view, lens, input_ids, sample[layer], basis, batch_size=batch_size, progress=advance)
        )
        report.alignments.append(
            stimulus_response_alignment(
                view, lens, input_ids, sample.pop(layer), layer, seed=config.seed, batch_size=batch_size,
                progress=advance,
            )  # the residuals of a finished layer are not needed again
        )  # fmt: skip
    return report
