"""Causal analyses of lenses: which directions of the residual stream a lens depends on, and whether the model
depends on them too.

    ablation.py    ablating directions (mean / zero / resample) in a lens and, by a hook, in the model
    influence.py   σ(v) = E[KL(lens(h) ‖ lens(ablate(h, v)))], the quantity extraction maximises
    reference.py   tuned-lens's greedy L-BFGS extraction (the baseline)
    fast.py        the default extraction: Fisher-surrogate start, then the whole frame on minibatches
    basis.py       CausalBasis, extract_basis, save_bases / load_bases
    fidelity.py    the same ablations in the model: model influence and Spearman ρ
    alignment.py   stimulus–response alignment (weighted Aitchison similarity)
    sample.py      the tokens and residuals every analysis of a layer shares

The fidelity PNG is drawn by `lenslab.plots.causal`.

>>> from lenslab.causal import ExtractionConfig, extract_basis, causal_fidelity  # doctest: +SKIP
"""

from lenslab.causal.ablation import ABLATIONS, Ablation, ablate, residual_edit
from lenslab.causal.alignment import Alignment, stimulus_response_alignment, weighted_aitchison_similarity
from lenslab.causal.basis import METHODS, CausalBasis, ExtractionConfig, extract_basis, load_bases, save_bases
from lenslab.causal.fast import FastConfig
from lenslab.causal.fidelity import Fidelity, causal_fidelity, model_influences
from lenslab.causal.influence import lens_influences
from lenslab.causal.sample import capture_sample

__all__ = [
    "ABLATIONS",
    "METHODS",
    "Ablation",
    "Alignment",
    "CausalBasis",
    "ExtractionConfig",
    "FastConfig",
    "Fidelity",
    "ablate",
    "capture_sample",
    "causal_fidelity",
    "extract_basis",
    "lens_influences",
    "load_bases",
    "model_influences",
    "residual_edit",
    "save_bases",
    "stimulus_response_alignment",
    "weighted_aitchison_similarity",
]
