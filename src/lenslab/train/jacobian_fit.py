"""Fitting a Jacobian lens on a corpus (`lenslab train --kind jacobian`): progress, checkpoints, torchrun.

There is no optimisation: the lens is the mean of per-prompt Jacobians (`lenslab.jacobian`), so a run is a loop over
prompts adding to float64 sums. The sums are checkpointed every `checkpoint_every` prompts, and a rerun of the same
command resumes after the last prompt they hold. Under torchrun each process takes every world_size-th prompt and
the sums are added over processes (at checkpoints and at the end), so the lens is the one a single process fits.
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
from lenslab.jacobian import JacobianLens, JacobianSums, check_prompt_length
from lenslab.train import checkpoints
from lenslab.train.distributed import Processes
from lenslab.train.stopping import TrainingInterrupted, interrupted_message, stop_between_steps

log = logging.getLogger(__name__)


@dataclass
class JacobianFitResult:
    lens: JacobianLens
    prompts: int
    """Prompts the lens averages over."""
    seconds: float
    """Time spent fitting, over every run that added to the sums."""
    already_fitted: bool = False
    """The output directory already held this lens, which was loaded rather than fitted again."""


def fit_jacobian_lens(
    view: ModelView,
    tokens: torch.Tensor,
    *,
    dim_batch: int = 32,
    output_dir: str | Path | None = None,
    resume: bool = True,
    overwrite: bool = False,
    checkpoint_every: int = 16,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> JacobianFitResult:
    """Fit a Jacobian lens on `tokens`: [prompts, seq_len] int64, one prompt per row (e.g. `TokenData.train`).

    With `output_dir`, checkpoints and the finished lens go there, with the same rules as `train_lens`: a run of
    the same data and model resumes, a finished one is returned as it is, another configuration's files are
    refused unless `overwrite`. `dim_batch` (copies of a prompt per backward pass) trades memory for speed and
    does not change the result, so it is not part of the run's fingerprint.
    """
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise LensLabError(f"Expected token ids of shape [prompts, seq_len], got {list(tokens.shape)}; pass data.")
    check_prompt_length(tokens.shape[1])
    processes = Processes.current()
    output_dir = Path(output_dir) if output_dir is not None else None
    writes = output_dir is not None and processes.is_main
    fingerprint = checkpoints.run_fingerprint(view, tokens, {"kind": JacobianLens.kind})
    view.model.eval().requires_grad_(False)
    sums = JacobianSums(view, dim_batch=dim_batch)
    done, elapsed = 0, 0.0
    with contextlib.ExitStack() as held:
        start = checkpoints.claim_output(
            held, output_dir, fingerprint, owner=writes, resume=resume, overwrite=overwrite
        )
        if start.finished:
            log.info("%s already holds the Jacobian lens this run would fit; loading it", output_dir)
            lens = JacobianLens.load(output_dir, view)
            return JacobianFitResult(lens, lens.prompts, lens.metadata.get("seconds", 0.0), already_fitted=True)
        if start.checkpoint is not None:
            done, elapsed = start.checkpoint.step, start.checkpoint.elapsed
            if processes.is_main:  # the others start from zero: the sums are added over processes
                sums.sums.copy_(start.checkpoint.lens["sums"])
        stop = held.enter_context(stop_between_steps())
        total = len(tokens)
        bar = held.enter_context(tqdm(
            total=total * tokens.shape[1], initial=done * tokens.shape[1], desc="Fitting Jacobian lens", unit="tok",
            unit_scale=True, disable=not (progress and processes.is_main), dynamic_ncols=True,
        ))  # fmt: skip
        # Each round fits one prompt per process; checkpoints fall between rounds.
        for first in range(done, total, processes.world_size):
            if stop.signum is not None:
                checkpoint_at = _checkpoint(output_dir, writes, sums, processes, first, fingerprint, elapsed)
                message = interrupted_message(stop.signum, first, output_dir, checkpoint_at, unit="prompt")
                raise TrainingInterrupted(message, stop.signum)
            started = time.perf_counter()
            mine = first + processes.rank
            if mine < total:
                sums.add(tokens[mine : mine + 1])
            elapsed += time.perf_counter() - started
            bar.update(min(processes.world_size, total - first) * tokens.shape[1])
            following = min(first + processes.world_size, total)
            if checkpoint_every and following < total and following // checkpoint_every > first // checkpoint_every:
                _checkpoint(output_dir, writes, sums, processes, following, fingerprint, elapsed)
        processes.sum_on([sums.sums], view.device)
        lens = JacobianLens(view, (sums.sums / total).float(), prompts=total)
        lens.metadata = {**(metadata or {}), "training": fingerprint, "prompts": total, "seconds": elapsed,
                         "seq_len": tokens.shape[1], "processes": processes.world_size}  # fmt: skip
        if writes:
            lens.save(output_dir)
            checkpoints.remove_checkpoint(output_dir)
        processes.barrier()
    return JacobianFitResult(lens, total, elapsed)


def _checkpoint(
    output_dir: Path | None,
    writes: bool,
    sums: JacobianSums,
    processes: Processes,
    prompts_done: int,
    fingerprint: dict[str, Any],
    elapsed: float,
) -> int | None:
    """Save the sums over every process after `prompts_done` prompts; returns that count, None without a folder."""
    if output_dir is None:
        return None
    total = sums.sums.clone()
    processes.sum_on([total], sums.view.device)
    if writes:
        checkpoints.save_checkpoint(output_dir, checkpoints.Checkpoint(
            step=prompts_done, fingerprint=fingerprint, lens={"sums": total}, optimizer={}, elapsed=elapsed,
        ))  # fmt: skip
    return prompts_done
