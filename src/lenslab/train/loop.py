"""`train_lens`: fit a tuned lens to a frozen model on packed token sequences.

A fresh run first fits the translators in closed form (`lenslab.train.closed_form`) on the first
`TrainConfig.init_tokens` tokens of its reading order, when that is above 0. Then one step reads
`sequences_per_step` sequences (`lenslab.train.batches`), in micro-batches of `TrainConfig.batch_size` sequences
(or as many as fit in free memory, `lenslab.train.batches.choose_micro_batch`). Each micro-batch is one forward
of the model under `no_grad` that captures every residual (and the final logits, for the plain objective), then
the recipe's backward (`lenslab.train.objective`): one per lens position, or one for all positions through the
chunked KL. Gradients are averaged over processes (`lenslab.train.distributed`), checked to be finite, and handed
to the recipe (`lenslab.train.recipes`) for the update. The output directory (`lenslab.train.checkpoints`, locked
for the run) gets a log line per step, a checkpoint every `checkpoint_every` steps, and finally the lens.

Two things stop a run early (`lenslab.train.stopping`): divergence, after which the last checkpoint from before it
is kept (each is written one step late, once the next step's loss has shown its lens sound), and SIGINT or SIGTERM,
after which a checkpoint of the step reached is written and `TrainingInterrupted` says where the run can resume.

>>> result = train_lens(view, data.train, TrainConfig(steps=100), output_dir="lens/")  # doctest: +SKIP
>>> result.history[-1].loss                                                            # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lenslab.adapter import ModelView
from lenslab.errors import LensLabError
from lenslab.lenses import TunedLens
from lenslab.train import checkpoints
from lenslab.train.batches import choose_micro_batch, sequences_per_step, step_indices
from lenslab.train.closed_form import fit_closed_form
from lenslab.train.config import TrainConfig, flag
from lenslab.train.distributed import Processes
from lenslab.train.objective import Objective, backward_by_layer, backward_chunked, choose_objective, final_target
from lenslab.train.recipes import RECIPES, Recipe
from lenslab.train.stopping import (
    DivergenceWatch,
    TrainingInterrupted,
    divergence_message,
    interrupted_message,
    stop_between_steps,
)

log = logging.getLogger(__name__)


@dataclass
class StepRecord:
    """What one training step did; also one line of `train_log.jsonl`."""

    step: int
    """Steps completed, counting this one (1-based)."""
    loss: float
    """The objective: the sum over lens positions 0..L-1 of the mean KL(p_final || p_lens) per token, in nats."""
    layer_losses: list[float]
    """[L] mean KL per token at each lens position, in nats."""
    lr: float
    """Effective learning rate of the step (`TrainConfig.lr` on the schedule; SGD's optimiser receives it times
    1 - momentum)."""
    grad_norm: float
    """Global gradient norm before clipping."""
    tokens: int
    """Tokens trained on so far, over all processes."""
    tokens_per_second: float
    """Tokens of this step (all processes) over its wall time."""
    elapsed: float
    """Seconds of training so far, across resumed runs."""


@dataclass
class TrainResult:
    """A trained lens and how training went."""

    lens: TunedLens
    """The trained lens (on the model's device)."""
    history: list[StepRecord]
    """One record per step, from step 1 (those before a resume included)."""
    init_tokens: int = 0
    """Tokens the closed-form start read (over all processes), besides those of the steps."""
    init_shrinkage: list[float] | None = None
    """[L] how far the closed-form start's map at each lens position was kept (1) or shrunk toward the identity (0)
    (`lenslab.train.closed_form`); None without a start, or with one too small to hold any sequence out."""
    already_trained: bool = False
    """The output directory already held the finished lens of this configuration, returned without training."""


def train_lens(
    view: ModelView,
    tokens: torch.Tensor,
    config: TrainConfig | None = None,
    *,
    output_dir: str | Path | None = None,
    resume: bool = True,
    overwrite: bool = False,
    lens: TunedLens | None = None,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> TrainResult:
    """Train a tuned lens for `view`'s model on `tokens`: [n_sequences, seq_len] int64 (e.g. `TokenData.train`).

    The model is put in eval mode and frozen. With `output_dir`, the run logs, checkpoints and saves the lens
    there, resumes from a checkpoint of the same configuration when `resume`, returns a finished lens of the same
    configuration as it is, and refuses a directory holding another configuration's files unless `overwrite`.
    `lens` (default: a new, untrained `TunedLens`) is trained in place (its translators are first replaced by the
    closed-form start when `config.effective_init_tokens` is above 0). Under `torchrun` (after
    `init_distributed`) every process calls this with the same tokens and reads its share of each step.
    `metadata` is saved with the lens; `on_step` is called with each step's record once it is logged.
    """
    config = config or TrainConfig()
    _check_tokens(view, tokens)
    processes = Processes.current()
    output_dir = Path(output_dir) if output_dir is not None else None
    num_sequences, seq_len = tokens.shape
    per_step = sequences_per_step(config.tokens_per_step, seq_len, processes.world_size)
    init_sequences = math.ceil(config.effective_init_tokens / seq_len)
    if init_sequences > num_sequences:
        _warn_cut(
            "init_tokens", config.effective_init_tokens, num_sequences * seq_len,
            f"the training data holds {num_sequences} sequences of {seq_len} tokens; pass --train-tokens of at least "
            f"{config.effective_init_tokens} to read them all",
        )  # fmt: skip
        init_sequences = num_sequences
    fingerprint = checkpoints.run_fingerprint(view, tokens, config.fingerprint())
    view.model.eval().requires_grad_(False)
    lens = TunedLens.from_model(view) if lens is None else lens
    params = [param for param in lens.parameters() if param.requires_grad]
    recipe = RECIPES[config.recipe](config)
    optimizer = recipe.build_optimizer(params)
    writes = output_dir is not None and processes.is_main

    with contextlib.ExitStack() as held:
        if writes:
            held.enter_context(checkpoints.own_output(output_dir, overwrite=overwrite))
        history: list[StepRecord] = []
        elapsed, first_step, checkpoint_step, shrinkage = 0.0, 0, None, None
        if output_dir is not None:
            start = checkpoints.plan_start(output_dir, fingerprint, resume=resume, overwrite=overwrite)
            if start.finished:
                log.info("%s already holds the lens this run would train; loading it", output_dir)
                finished = TunedLens.load(output_dir, view)
                return TrainResult(
                    finished, [StepRecord(**r) for r in checkpoints.read_log(output_dir)],
                    init_tokens=init_sequences * seq_len, init_shrinkage=finished.metadata.get("init_shrinkage"),
                    already_trained=True,
                )  # fmt: skip
            if start.checkpoint is not None:
                lens.load_state_dict(start.checkpoint.lens)
                optimizer.load_state_dict(start.checkpoint.optimizer)
                checkpoints.restore_rng(start.checkpoint.rng)
                history = [StepRecord(**record) for record in start.checkpoint.history]
                elapsed, first_step = start.checkpoint.elapsed, start.checkpoint.step
                checkpoint_step, shrinkage = first_step, start.checkpoint.init_shrinkage
            if writes:
                checkpoints.write_log(output_dir, [asdict(record) for record in history])
        objective = choose_objective(view, recipe.chunked_kl, config.mixed_precision)
        micro_batch = config.batch_size or choose_micro_batch(view, seq_len, objective.chunked)
        _log_plan(config, per_step, seq_len, num_sequences, micro_batch, processes)

        if first_step == 0 and init_sequences:
            started = time.perf_counter()
            shrinkage = _closed_form_start(
                view, lens, tokens, init_sequences, micro_batch, recipe, optimizer, processes
            )  # fmt: skip
            elapsed += time.perf_counter() - started
        # Taken over only now: a Ctrl-C during the closed-form start, which no checkpoint could keep, stops at once.
        stop = held.enter_context(stop_between_steps())
        steps = config.effective_steps
        step_tokens = per_step * seq_len  # over all processes
        # Closed however the loop ends, so that an error message starts on a line of its own.
        bar = held.enter_context(tqdm(
            total=steps, initial=first_step, desc="Training lens", unit="step",
            disable=not (progress and processes.is_main), dynamic_ncols=True,
        ))  # fmt: skip
        due: tuple[int, dict[str, Any]] | None = None  # (step, RNG state) of a checkpoint not yet written
        watch = DivergenceWatch()
        for step in range(first_step, steps):
            if stop.signum is not None:
                if output_dir is not None and step > (checkpoint_step or 0) and watch.sound:
                    _save_checkpoint(output_dir, writes, step, fingerprint, lens, optimizer, history, shrinkage)
                    checkpoint_step = step
                message = interrupted_message(stop.signum, step, output_dir, checkpoint_step)
                raise TrainingInterrupted(message, stop.signum)
            started = time.perf_counter()
            indices = step_indices(step, per_step, num_sequences, config.seed)[processes.rank :: processes.world_size]
            layer_losses = _accumulate_gradients(view, lens, tokens[indices], micro_batch, objective)
            grads = [param.grad for param in params if param.grad is not None]
            processes.average([layer_losses, *grads])
            grad_norm = torch.nn.utils.get_total_norm(grads)
            loss = layer_losses.sum().item()
            diverged = watch.observe(loss, layer_losses, grad_norm, history[0].loss if history else None)
            if diverged is not None:
                raise LensLabError(divergence_message(step, diverged, output_dir, checkpoint_step, config, view.dtype))
            # The lens and optimiser are still as the due checkpoint's step left them, and this loss shows them sound.
            if due is not None and watch.sound:
                _save_checkpoint(output_dir, writes, due[0], fingerprint, lens, optimizer, history, shrinkage, due[1])
                checkpoint_step = due[0]  # on every process, so that any of them can name it in an error
            due = None
            lr = recipe.update(optimizer, params, step, grad_norm)
            optimizer.zero_grad(set_to_none=True)

            seconds = time.perf_counter() - started
            elapsed += seconds
            record = StepRecord(
                step=step + 1, loss=loss, layer_losses=layer_losses.tolist(), lr=lr, grad_norm=grad_norm.item(),
                tokens=(step + 1) * step_tokens, tokens_per_second=step_tokens / seconds, elapsed=elapsed,
            )  # fmt: skip
            history.append(record)
            if writes:
                checkpoints.append_log(output_dir, asdict(record))
            # No checkpoint after the last step: the finished lens is saved instead.
            every = config.checkpoint_every
            if output_dir is not None and every and record.step % every == 0 and record.step < steps:
                due = (record.step, checkpoints.capture_rng())
            bar.set_postfix(loss=f"{record.loss:.4g}", tok_s=f"{record.tokens_per_second:,.0f}", refresh=False)
            bar.update()
            if on_step is not None:
                on_step(record)

        lens.metadata = {
            **(metadata or {}),
            "training": fingerprint,
            "steps_done": steps,
            "tokens_seen": steps * step_tokens,
            "init_tokens": init_sequences * seq_len,
            "init_shrinkage": shrinkage,
            "final_loss": history[-1].loss if history else None,
            "processes": processes.world_size,
        }
        if writes:
            lens.save(output_dir)
            checkpoints.remove_checkpoint(output_dir)
            log.debug("Saved the tuned lens to %s", output_dir)
        processes.barrier()
    return TrainResult(lens=lens, history=history, init_tokens=init_sequences * seq_len, init_shrinkage=shrinkage)


def _save_checkpoint(
    output_dir: Path,
    writes: bool,
    step: int,
    fingerprint: dict[str, Any],
    lens: TunedLens,
    optimizer: torch.optim.Optimizer,
    history: list[StepRecord],
    shrinkage: list[float] | None,
    rng: dict[str, Any] | None = None,
) -> None:
    """Checkpoint the lens and optimiser as they are, which must be as `step` steps left them (when `writes`: on
    the main process), with `rng` as it was then (default: as it is)."""
    if not writes:
        return
    checkpoints.save_checkpoint(
        output_dir,
        checkpoints.Checkpoint(
            step=step, fingerprint=fingerprint, lens=lens.state_dict(), optimizer=optimizer.state_dict(),
            history=[asdict(record) for record in history[:step]], elapsed=history[step - 1].elapsed,
            rng=checkpoints.capture_rng() if rng is None else rng, init_shrinkage=shrinkage,
        ),
    )  # fmt: skip


def _closed_form_start(
    view: ModelView,
    lens: TunedLens,
    tokens: torch.Tensor,
    init_sequences: int,
    micro_batch: int,
    recipe: Recipe,
    optimizer: torch.optim.Optimizer,
    processes: Processes,
) -> list[float] | None:
    """Fit the translators in closed form and start the recipe from its statistics; returns the shrinkage chosen.

    Its own function so that the normal equations (host memory, see `lenslab.train.closed_form`) are freed before
    the first step.
    """
    # The first sequences of the reading order: the first steps read them again.
    indices = step_indices(0, init_sequences, len(tokens), recipe.config.seed)
    start = fit_closed_form(view, lens, tokens[indices], micro_batch, recipe.config.ridge, processes)
    recipe.start(optimizer, start.equations)
    return start.shrinkage


def _accumulate_gradients(
    view: ModelView, lens: TunedLens, tokens: torch.Tensor, micro_batch: int, objective: Objective
) -> torch.Tensor:
    """Add to the lens's `.grad`s the gradient of the step's loss on this process's `tokens`: [n, seq_len];
    returns the mean KL per token at each lens position 0..L-1: [L]."""
    scale = 1.0 / tokens.numel()  # each backward scaled so that the accumulated gradient is that of the mean
    layer_sums = torch.zeros(view.num_layers, device=view.device)
    for batch in tokens.split(micro_batch):
        input_ids = batch.to(view.device)
        with torch.no_grad(), view.fused_activations():
            # Packed sequences have no padding; the explicit mask only tells transformers so, since the
            # separator token is often also the pad token and would otherwise draw a warning.
            residuals = view.capture(input_ids, torch.ones_like(input_ids), need_logits=not objective.chunked)
        hidden, logits = residuals
        del residuals
        if objective.chunked:
            layer_sums += backward_chunked(lens, hidden, scale, low_precision=objective.low_precision)
        else:
            target = final_target(logits)
            del logits  # the model's logits have served: one [batch, seq, vocab] tensor fewer during the backward
            layer_sums += backward_by_layer(lens, hidden, target, scale, objective.autocast)
            del target
        # Freed before the next forward, so two batches' [batch, seq, vocab] tensors are never alive at once.
        del hidden
    return layer_sums / tokens.numel()


def _check_tokens(view: ModelView, tokens: torch.Tensor) -> None:
    """Refuse token tensors the model cannot read."""
    if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32) or tokens.shape[0] == 0:
        raise LensLabError(
            f"Training tokens must be a non-empty [n_sequences, seq_len] integer tensor, got {tokens.dtype} of shape "
            f"{list(tokens.shape)}; pass TokenData.train from lenslab.data.prepare_tokens."
        )
    vocab = view.model.get_input_embeddings().num_embeddings
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise LensLabError(
            f"Training tokens range over {tokens.min().item()}..{tokens.max().item()} but the model reads ids "
            f"0..{vocab - 1}; tokenize the data with this model's tokenizer."
        )


def _warn_cut(name: str, asked: int, used: int, why: str) -> None:
    """Warn that the `TrainConfig` setting `name` is cut from `asked` to `used`, and `why` (a clause naming the fix)."""
    log.warning("%s %d is cut to %d: %s.", flag(name), asked, used, why)


def _log_plan(
    config: TrainConfig, per_step: int, seq_len: int, num_sequences: int, micro_batch: int, processes: Processes
) -> None:
    """Say how the token budget maps onto sequences and micro-batches; warn when sequences will be read more than
    once or `batch_size` is more than a step holds."""
    if per_step * seq_len != config.tokens_per_step:
        log.info(
            "Using %d sequences of %d tokens (%d tokens) per step for --tokens-per-step %d",
            per_step, seq_len, per_step * seq_len, config.tokens_per_step,
        )  # fmt: skip
    needed = config.effective_steps * per_step
    if needed > num_sequences:
        log.warning(
            "The data holds %d sequences but %d steps read %d, so each is read about %.1f times; pass more "
            "--train-tokens to see each once.", num_sequences, config.effective_steps, needed, needed / num_sequences,
        )  # fmt: skip
    share = per_step // processes.world_size
    if config.batch_size is not None and config.batch_size > share:
        _warn_cut(
            "batch_size", config.batch_size, share,
            f"each process reads only {share} sequences per step; pass more --tokens-per-step for larger steps",
        )  # fmt: skip
    log.info(
        "Training %d steps of %d sequences in micro-batches of %d on %d process(es)",
        config.effective_steps, per_step, min(micro_batch, share), processes.world_size,
    )  # fmt: skip
