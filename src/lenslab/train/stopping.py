"""What stops a training run early: divergence, and SIGINT or SIGTERM.

Divergence: a step whose loss or gradient norm is not finite, or a loss above `DIVERGENCE_FACTOR` times the first
step's for `DIVERGENCE_STEPS` steps in a row without halving (`DivergenceWatch`), stops the run with a
`LensLabError` (`divergence_message`) before the lens is updated. While the latest losses are suspect, no checkpoint
is written: the training loop writes each checkpoint one step late, once the next step's loss has shown its lens
sound, so that the checkpoint kept is really from before the divergence.

Signals: inside `stop_between_steps`, SIGINT (Ctrl-C) or SIGTERM asks the loop to stop once the step in progress
completes; the loop writes a checkpoint of it and raises `TrainingInterrupted`, whose message
(`interrupted_message`) says where the run can resume. A second signal stops at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lenslab.train import checkpoints
from lenslab.train.config import TrainConfig, flag

log = logging.getLogger(__name__)

DIVERGENCE_FACTOR = 2.0
"""A step whose loss is above this multiple of the first step's is suspect. A diverging lens climbs past it within a
few steps and stays there or climbs on (`--lr 1e6` took a real model from 0.96 to 27.6 nats); batches differ by tens
of percent."""
DIVERGENCE_STEPS = 4
"""Suspect steps in a row whose last loss is above half their first stop the run. A passing spike falls faster: on
tiny models the fast recipe's first whitened steps, or the paper recipe at ten times its learning rate, rise up to
seventeen-fold above a first loss that is already small, then fall to a third within three steps; a diverged lens
drifts down far slower if at all (37 to 31 nats in five steps on a tiny model at `--lr 1e6`)."""


@dataclass
class DivergenceWatch:
    """Each step's loss, watched for divergence (see the module docstring)."""

    suspect: list[float] = field(default_factory=list)
    """The losses of the latest steps in a row above `DIVERGENCE_FACTOR` times the first step's."""

    @property
    def sound(self) -> bool:
        """Whether the latest step's loss was not suspect: while it is, no checkpoint is written."""
        return not self.suspect

    def observe(
        self, loss: float, layer_losses: torch.Tensor, grad_norm: torch.Tensor, first_loss: float | None
    ) -> str | None:
        """Record a step's `loss` (the sum of its [L] `layer_losses`) and `grad_norm`, given the first step's loss
        (None at the first step); returns what diverged, as a clause for `divergence_message`, or None."""
        if not (torch.isfinite(layer_losses).all() and torch.isfinite(grad_norm)):
            return _not_finite(layer_losses, grad_norm)
        climbed = first_loss is not None and loss > DIVERGENCE_FACTOR * first_loss
        self.suspect = [*self.suspect, loss] if climbed else []
        if len(self.suspect) >= DIVERGENCE_STEPS and self.suspect[-1] > self.suspect[-DIVERGENCE_STEPS] / 2:
            return (
                f"its loss, {loss:.4g}, and that of the {len(self.suspect) - 1} steps before it were above "
                f"{DIVERGENCE_FACTOR:g} times step 1's, {first_loss:.4g}, without halving"
            )
        return None


def _not_finite(layer_losses: torch.Tensor, grad_norm: torch.Tensor) -> str:
    """What was not finite in a step: a lens position's loss ([L] `layer_losses`), else the gradient norm."""
    bad = (~torch.isfinite(layer_losses)).nonzero().flatten().tolist()
    if bad:
        return f"the loss at lens position {bad[0]} was {layer_losses[bad[0]].item()}, which is not finite"
    return f"the gradient norm was {grad_norm.item()}, which is not finite"


def divergence_message(
    step: int, what: str, output_dir: Path | None, checkpoint_step: int | None, config: TrainConfig, dtype: torch.dtype
) -> str:
    """One sentence on where training diverged (`what` happened at 0-based `step`), what was kept and what to try."""
    if output_dir is None:
        kept = "the lens is left as it was after the last step"
    elif checkpoint_step is not None:
        kept = f"the last good checkpoint (step {checkpoint_step}) is kept in {output_dir / checkpoints.CHECKPOINT_DIR}"
    else:
        kept = "no checkpoint from before it had been written"
    # Half precision can overflow where float32 would not; a float32 run has no such way out.
    precision = " or --dtype float32" if dtype in (torch.float16, torch.bfloat16) else ""
    return (
        f"Training diverged at step {step + 1} ({what}) and stopped before updating the lens; {kept}; pass a "
        f"lower {flag('lr')} than this run's {config.effective_lr:g}{precision}, with --overwrite, to train again."
    )


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped `train_lens` between steps; its message says where the run can resume."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        """The signal received; a command line exits with 128 + signum (130 for SIGINT, 143 for SIGTERM)."""


@dataclass
class StopRequest:
    signum: int | None = None
    """The signal that asked training to stop, None while none has."""


@contextlib.contextmanager
def stop_between_steps() -> Iterator[StopRequest]:
    """Turn SIGINT and SIGTERM into a request to stop once the step in progress completes; a second one stops at
    once (KeyboardInterrupt). Signals are left alone off the main thread, where Python cannot handle them."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: Any) -> None:
        if request.signum is not None:
            raise KeyboardInterrupt
        request.signum = signum
        log.warning("%s received: stopping after the step in progress", signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def interrupted_message(
    signum: int, step: int, output_dir: Path | None, checkpoint_step: int | None, unit: str = "step"
) -> str:
    """One sentence on a run stopped by `signum` after `step` units of work (steps; prompts for a fit), and where
    it can resume."""
    name = signal.Signals(signum).name
    if output_dir is None:
        return f"{name} received: training stopped after {unit} {step}, the lens left as it was then."
    if checkpoint_step is None:
        return (
            f"{name} received after {unit} {step}, with no checkpoint to keep, so running the same command again "
            "starts over."
        )
    return (
        f"{name} received: training stopped after {unit} {step}; run the same command again to resume from the "
        f"checkpoint at {unit} {checkpoint_step} in {output_dir / checkpoints.CHECKPOINT_DIR}."
    )
