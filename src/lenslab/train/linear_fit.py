"""Fitting a linear lens on a corpus (`lenslab train --kind linear`): the fast recipe's closed-form start, kept.

The linear lens (Din et al. 2023, "Jump to Conclusions") is each position's ridge least-squares affine map to the
last residual, shrunk toward the identity where held-out tokens decode better with less of it: exactly what the
fast recipe's start computes (`lenslab.train.closed_form`), read in the same order (the first epoch of
`step_indices` under `seed`), so a linear lens equals the start a tuned-lens run of the same tokens begins from.
No SGD step follows. The fit is one pass over its tokens with no checkpoint (an interrupted fit starts over);
the output folder follows the rules of `lenslab.train.checkpoints` like any run's: locked, refused when it holds
another configuration's files, and returned as it is when it already holds this run's lens. Under torchrun each
process reads its share of the tokens and the normal equations are averaged over processes before solving.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lenslab.adapter import ModelView
from lenslab.errors import LensLabError
from lenslab.lenses import LinearLens
from lenslab.train import checkpoints
from lenslab.train.batches import choose_micro_batch, step_indices
from lenslab.train.closed_form import fit_closed_form, tokens_read
from lenslab.train.distributed import Processes

log = logging.getLogger(__name__)


@dataclass
class LinearFitResult:
    lens: LinearLens
    tokens: int
    """Tokens the lens was fitted on (over all processes), the held-out ones that chose the shrinkage included."""
    seconds: float
    """Time spent fitting."""
    shrinkage: list[float] | None
    """[L] each position's scale of its fitted map (1: the fit, 0: the logit lens); None when the tokens were a
    single sequence, which leaves none to hold out."""
    already_fitted: bool = False
    """The output directory already held this lens, which was loaded rather than fitted again."""


def fit_linear_lens(
    view: ModelView,
    tokens: torch.Tensor,
    *,
    ridge: float = 1e-4,
    seed: int = 0,
    micro_batch: int | None = None,
    output_dir: str | Path | None = None,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> LinearFitResult:
    """Fit a linear lens on `tokens`: [sequences, seq_len] int64 (e.g. `TokenData.train`), every one of them.

    `ridge` and `seed` are `TrainConfig`'s (the penalty, and the order that decides which sequences are held out);
    `micro_batch` (sequences per forward; default: as many as fit, `choose_micro_batch`) does not change the lens.
    With `output_dir`, the lens is saved there, with the same rules as `train_lens` (see the module docstring).
    """
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise LensLabError(f"Expected token ids of shape [sequences, seq_len], got {list(tokens.shape)}; pass data.")
    processes = Processes.current()
    output_dir = Path(output_dir) if output_dir is not None else None
    writes = output_dir is not None and processes.is_main
    settings = {"kind": LinearLens.kind, "ridge": ridge, "seed": seed}
    fingerprint = checkpoints.run_fingerprint(view, tokens, settings)
    view.model.eval().requires_grad_(False)
    with contextlib.ExitStack() as held:
        start = checkpoints.claim_output(
            held, output_dir, fingerprint, owner=writes, resume=resume, overwrite=overwrite
        )
        if start.finished:
            log.info("%s already holds the linear lens this run would fit; loading it", output_dir)
            lens = LinearLens.load(output_dir, view)
            meta = lens.metadata
            return LinearFitResult(
                lens, meta.get("tokens", tokens.numel()), meta.get("seconds", 0.0), meta.get("shrinkage"),
                already_fitted=True,
            )  # fmt: skip
        micro_batch = micro_batch or choose_micro_batch(view, tokens.shape[1], chunked=True)
        order = step_indices(0, len(tokens), len(tokens), seed)  # the fast recipe's start reads this order
        ordered = tokens[order]
        lens = LinearLens.from_model(view)
        bar = held.enter_context(tqdm(
            total=tokens_read(ordered, processes), desc="Fitting linear lens", unit="tok", unit_scale=True,
            disable=not (progress and processes.is_main), dynamic_ncols=True,
        ))  # fmt: skip
        started = time.perf_counter()
        fitted = fit_closed_form(view, lens, ordered, micro_batch, ridge, processes, progress=bar.update)
        seconds = time.perf_counter() - started
        lens.metadata = {**(metadata or {}), "training": fingerprint, "tokens": tokens.numel(),
                         "shrinkage": fitted.shrinkage, "seconds": seconds, "seq_len": tokens.shape[1],
                         "processes": processes.world_size}  # fmt: skip
        if writes:
            lens.save(output_dir)
            checkpoints.remove_checkpoint(output_dir)  # another configuration's, which --overwrite replaces
        processes.barrier()
    return LinearFitResult(lens, tokens.numel(), seconds, fitted.shrinkage)
