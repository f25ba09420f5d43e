"""`lenslab cbe`: causal basis extraction, causal fidelity and stimulus–response alignment, layer by layer
(`lenslab.runs.causal`).

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

from lenslab.cli.flags import LENSES, MODEL, TEXT, Command, Spec
from lenslab.command_specs import CAUSAL_FILES, CAUSAL_SEQ_LEN
from lenslab.specs import positive_int

COMMANDS = [
    Command(
        "cbe", "causal basis extraction: the directions a lens depends on, and whether the model does too",
        "Find the k most influential orthonormal directions of the residual stream for a lens at each layer (causal "
        "basis extraction), ablate each in the model to measure its influence there (causal fidelity, Spearman rho), "
        f"and measure stimulus-response alignment. Writes {', '.join(CAUSAL_FILES)} into --output. --seq-len defaults "
        f"to at most {CAUSAL_SEQ_LEN} here.",
        (
            MODEL, LENSES, TEXT,
            Spec("lenslab.causal.basis:ExtractionConfig", "extraction", only=("k", "method", "ablation", "seed")),
            Spec("lenslab.command_specs:CausalSpec", "sample and output", flags={
                "output": {"names": ("--output", "-o"), "metavar": "DIR"}, "layers": {"metavar": "all|L1,L2,..."},
                "tokens": {"type": positive_int, "metavar": "N"}, "batch_size": {"type": positive_int, "metavar": "N"},
            }),
        ),
        "lenslab.runs:causal",
    )
]  # fmt: skip
