"""Causal basis extraction: the k directions of the residual stream a lens depends on most.

For lens position l and a sample of residuals h, find orthonormal v_1..v_k, each with a large influence
σ(v) = E[KL(lens(h) ‖ lens(ablate(h, v)))] (`lenslab.causal.influence`), and return them sorted by influence,
descending. Two methods find them (``ExtractionConfig.method``):

- ``"fast"`` (default): `lenslab.causal.fast`, the whole frame at once from a Fisher-surrogate start;
- ``"reference"``: `lenslab.causal.reference`, tuned-lens's greedy L-BFGS, one direction after another.

Whatever the method, the influences are recomputed at the end on the whole sample, one direction ablated at a
time, and the directions sorted by them, so the two methods report the same quantity.

>>> basis = extract_basis(lens, residuals, layer=3, config=ExtractionConfig(k=8))   # doctest: +SKIP
>>> basis.directions.shape, basis.influences                                        # doctest: +SKIP
(torch.Size([8, 256]), tensor([0.34, 0.30, ...]))
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from lenslab.causal.ablation import ABLATIONS, Ablation
from lenslab.causal.fast import FastConfig, fast_directions
from lenslab.causal.influence import lens_influences
from lenslab.causal.reference import MAX_EVALUATIONS, reference_directions
from lenslab.errors import LensLabError
from lenslab.io import atomic_write
from lenslab.lenses import Lens

METHODS: tuple[str, ...] = ("fast", "reference")
"""Extraction methods, default first."""
BASES_FILE = "bases.safetensors"
"""File name of saved bases inside an output directory."""


@dataclass
class ExtractionConfig:
    """Settings of `extract_basis`."""

    k: int = 8
    """Directions per layer (at most d_model)."""
    method: Literal["fast", "reference"] = "fast"
    """``"fast"`` (joint frame, `lenslab.causal.fast`) or ``"reference"`` (tuned-lens's greedy L-BFGS)."""
    ablation: Literal["mean", "zero", "resample"] = "mean"
    """What replaces the ablated component: the sample mean, zero, or another sequence's residual."""
    seed: int = 0
    """Seeds the resample pairing and the fast method's sampling."""
    fast: FastConfig = field(default_factory=FastConfig)
    """Settings of the fast method."""
    max_evaluations: int = MAX_EVALUATIONS
    """Objective evaluations per direction of the reference method."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LensLabError(f"Unknown method {self.method!r}; pass --method one of {', '.join(METHODS)}.")
        if self.ablation not in ABLATIONS:
            raise LensLabError(f"Unknown ablation {self.ablation!r}; pass --ablation one of {', '.join(ABLATIONS)}.")
        if self.k < 1:
            raise LensLabError(f"--k is {self.k}; pass a positive number of directions per layer.")


@dataclass
class CausalBasis:
    """The causal basis of one lens position."""

    layer: int
    """Lens position (0 = input of layer 0, l = output of layer l - 1)."""
    directions: Tensor
    """[k, d_model] float32, orthonormal rows, sorted by influence (descending)."""
    influences: Tensor
    """[k] float32 nats: σ of each direction ablated alone, on the extraction sample, descending."""
    ablation: Ablation
    """The ablation used (its kind, the sample mean, the resample pairing); fidelity reuses it."""
    method: str
    """``"fast"`` or ``"reference"``."""
    seconds: float = 0.0
    """Wall time of the extraction, final recomputation of the influences included."""

    @property
    def total_influence(self) -> float:
        """Sum of the k individual influences (nats): the quantity the methods are compared on."""
        return float(self.influences.sum())


def check_request(lens: Lens, layer: int, k: int) -> None:
    """Raise a LensLabError for a lens position out of range or more directions than the residual has."""
    if not 0 <= layer < len(lens):
        raise LensLabError(
            f"Layer {layer} is out of range: this model has lens positions 0..{len(lens) - 1}; pass --layers "
            f"within that range (or 'all')."
        )
    d_model = lens.view.d_model
    if not 1 <= k <= d_model:
        raise LensLabError(f"--k is {k} but the residual stream has {d_model} dimensions; pass 1 <= --k <= {d_model}.")


def extract_basis(
    lens: Lens,
    residuals: Tensor,
    layer: int,
    config: ExtractionConfig | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> CausalBasis:
    """The k most influential orthonormal directions of the lens at ``layer``.

    residuals: [n_seq, seq, d_model] the sample's residuals at lens position ``layer`` (sequences are kept
    apart for resample ablation). ``progress`` is called by the method as it goes (per direction for the
    reference, per step for the fast method).
    """
    config = config or ExtractionConfig()
    check_request(lens, layer, config.k)
    if residuals.ndim != 3 or residuals.shape[-1] != lens.view.d_model:
        raise LensLabError(
            f"Expected residuals of shape [n_seq, seq, {lens.view.d_model}], got {list(residuals.shape)}; pass "
            f"residuals captured from the lens's model."
        )
    ablation = Ablation.from_sample(config.ablation, residuals, seed=config.seed)
    h = residuals.detach().flatten(0, 1)  # [n, d_model]
    replacement = ablation.replacement(residuals)
    replacement = replacement.flatten(0, 1) if replacement.ndim == 3 else replacement  # [n, d] or [d]
    start = time.perf_counter()
    if config.method == "reference":
        directions = reference_directions(
            lens, layer, h, replacement, config.k, max_evaluations=config.max_evaluations, seed=config.seed,
            progress=progress,
        )  # fmt: skip
    else:
        directions = fast_directions(
            lens, layer, h, replacement, config.k, config=config.fast, seed=config.seed, progress=progress
        )
    influences = lens_influences(lens, layer, h, directions, replacement)
    order = influences.argsort(descending=True)
    return CausalBasis(
        layer=layer,
        directions=directions[order].contiguous(),
        influences=influences[order],
        ablation=ablation,
        method=config.method,
        seconds=time.perf_counter() - start,
    )


def save_bases(path: str | Path, bases: list[CausalBasis]) -> None:
    """Write bases atomically to one safetensors file.

    Tensors: ``layer.<l>`` [k, d_model] directions (rows, in order), ``influence.<l>`` [k], ``mean.<l>``
    [d_model] and, for resample ablation, ``partner.<l>`` [n_seq]; the method and ablation go in the metadata.
    """
    tensors: dict[str, Tensor] = {}
    for basis in bases:
        tensors[f"layer.{basis.layer}"] = basis.directions.detach().float().cpu().contiguous()
        tensors[f"influence.{basis.layer}"] = basis.influences.detach().float().cpu().contiguous()
        tensors[f"mean.{basis.layer}"] = basis.ablation.mean.detach().float().cpu().contiguous()
        if basis.ablation.partner is not None:
            tensors[f"partner.{basis.layer}"] = basis.ablation.partner.cpu().contiguous()
    metadata = {
        "layers": json.dumps(
            {str(b.layer): {"method": b.method, "ablation": b.ablation.kind, "seconds": b.seconds} for b in bases}
        )
    }
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_bases(path: str | Path) -> dict[int, CausalBasis]:
    """Read a file written by `save_bases`: lens position -> basis."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            layers = json.loads((handle.metadata() or {})["layers"])
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise LensLabError(
            f"Could not read causal bases from {path} ({error}); pass a file written by lenslab cbe."
        ) from None
    bases = {}
    for key, info in layers.items():
        layer = int(key)
        ablation = Ablation(
            kind=info["ablation"], mean=tensors[f"mean.{layer}"], partner=tensors.get(f"partner.{layer}")
        )
        bases[layer] = CausalBasis(
            layer=layer,
            directions=tensors[f"layer.{layer}"],
            influences=tensors[f"influence.{layer}"],
            ablation=ablation,
            method=info["method"],
            seconds=float(info["seconds"]),
        )
    return bases
