"""One `lenslab train` run from its specs: load the model, read the tokens its lens kind needs, make the lens.

    run = run_training(ModelSpec("gpt2"), TextSpec("corpus.txt"), TrainConfig(), TrainSpec(Path("lenses/gpt2")))
    run.reading()   # two lines: where the lens is, and what it reached

The kinds (`TrainSpec.kind`) differ in what they read and what makes them: "tuned" is trained (`train_lens`) on
`--steps` x `--tokens-per-step` tokens (or `--init-tokens`, if more); "linear" is the closed-form least-squares fit
(`lenslab.train.linear_fit`) of the fast recipe's default `--init-tokens`; "jacobian" the mean Jacobian
(`lenslab.train.jacobian_fit`) over `JACOBIAN_PROMPTS` prompts. `--train-tokens` replaces each default. Every kind
writes its output folder under the same rules (`lenslab.train.checkpoints`), held from before the model loads so that
a folder in use or not lenslab's is refused at once. Ctrl-C or SIGTERM ends the run with `TrainRun.stopped` set.
Under torchrun every process calls `run_training`; only the main one writes, and only its `TrainRun.reports`.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lenslab.adapter import ModelView
from lenslab.command_specs import TrainSpec
from lenslab.errors import LensLabError
from lenslab.specs import ModelSpec, TextSpec
from lenslab.train import jacobian_fit, linear_fit, loop
from lenslab.train.batches import sequences_per_step
from lenslab.train.checkpoints import CHECKPOINT_DIR, STATE_FILE, own_output
from lenslab.train.config import RECIPE_DEFAULTS, TrainConfig
from lenslab.train.distributed import Processes, init_distributed, shutdown_distributed
from lenslab.train.jacobian_fit import JacobianFitResult
from lenslab.train.linear_fit import LinearFitResult
from lenslab.train.loop import TrainResult
from lenslab.train.stopping import TrainingInterrupted

if TYPE_CHECKING:
    from torch import Tensor

JACOBIAN_PROMPTS = 100
"""Prompts a Jacobian lens averages over by default: about 100 of 128 tokens already serve (Gurnee et al.)."""
LINEAR_TOKENS = RECIPE_DEFAULTS["fast"].init_tokens
"""Tokens a linear lens is fitted on by default: those of the fast recipe's closed-form start, which it is."""


@dataclass
class TrainRun:
    """What one `lenslab train` run made, and how to say so."""

    spec: TrainSpec
    reports: bool
    """This process reports the run (the main one under torchrun)."""
    result: TrainResult | LinearFitResult | JacobianFitResult | None = None
    """The kind's own result (`spec.kind`: tuned, linear, jacobian); None when the run was stopped."""
    nats_to_bits_per_byte: float = 1.0
    """Converts the training text's nats per token to bits per byte."""
    stopped: TrainingInterrupted | None = None
    """SIGINT or SIGTERM stopped the run; its message says whether and where it can resume."""

    def reading(self) -> tuple[str, str]:
        """Where the lens is and what it took; what it reached, or how to use it (of a run not stopped)."""
        output, result = self.spec.output, self.result
        assert result is not None, "a stopped run has no reading; report TrainRun.stopped"
        if isinstance(result, JacobianFitResult):
            return _jacobian_reading(output, result)
        if isinstance(result, LinearFitResult):
            return _linear_reading(output, result)
        return _tuned_reading(output, result, self.nats_to_bits_per_byte)


def run_training(model: ModelSpec, text: TextSpec, config: TrainConfig, spec: TrainSpec) -> TrainRun:
    """Make the lens `spec` asks for (see the module docstring); joins torchrun's process group for the run."""
    if spec.kind == "jacobian" and text.seq_len is not None:
        from lenslab.jacobian import check_prompt_length

        check_prompt_length(text.seq_len)  # before the model loads
    if model.device_map is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LensLabError(
            "--device-map spreads one model over all devices, while torchrun runs one copy per device; run lenslab "
            "train without torchrun or drop --device-map."
        )
    device = init_distributed(model.device)
    processes = Processes.current()  # read now: the group is left before returning
    try:
        with own_output(spec.output, overwrite=spec.overwrite) if processes.is_main else contextlib.nullcontext():
            loaded = model.load(device=device)
            view = ModelView.from_model(loaded.model)
            seq_len = text.chunk_length(loaded)
            budget = train_tokens(spec, config, seq_len, processes)
            data = text.tokens(loaded, heldout=spec.heldout_tokens, train=budget, seq_len=seq_len)
            metadata = {
                "model": model.model,
                "model_revision": model.revision,
                "data": {
                    "source": data.source, "seq_len": data.seq_len, "train_sequences": len(data.train),
                    "heldout_tokens": spec.heldout_tokens, "bytes_per_token": data.bytes_per_token,
                },
            }  # fmt: skip
            result = _make_lens(view, data.train, config, spec, metadata)
    except TrainingInterrupted as stopped:
        return TrainRun(spec, processes.is_main, stopped=stopped)
    except KeyboardInterrupt:  # before training began, or a second Ctrl-C during it
        message = f"interrupted; {_resume_hint(spec.output)}."
        return TrainRun(spec, processes.is_main, stopped=TrainingInterrupted(message, signal.SIGINT))
    finally:
        shutdown_distributed()
    return TrainRun(spec, processes.is_main, result, data.nats_to_bits_per_byte)


def train_tokens(spec: TrainSpec, config: TrainConfig, seq_len: int, processes: Processes) -> int:
    """Training tokens the run reads: `--train-tokens`, or its kind's default (see the module docstring)."""
    if spec.train_tokens:
        return spec.train_tokens
    if spec.kind == "jacobian":
        return JACOBIAN_PROMPTS * seq_len
    if spec.kind == "linear":
        return LINEAR_TOKENS
    # Exactly the tokens the steps read, so that no sequence is read twice, unless the closed-form start asks for more
    # (it would be cut to what the data holds).
    per_step = sequences_per_step(config.tokens_per_step, seq_len, processes.world_size)
    return max(config.effective_steps * per_step * seq_len, config.effective_init_tokens)


def _resume_hint(output: Path) -> str:
    """What running the same command again does after a run into `output` was interrupted before it could stop
    cleanly."""
    if (output / CHECKPOINT_DIR / STATE_FILE).is_file():
        return f"run the same command again to resume from the checkpoint in {output / CHECKPOINT_DIR}"
    return "no checkpoint was written, so running the same command again starts over"


def _make_lens(
    view: ModelView, tokens: Tensor, config: TrainConfig, spec: TrainSpec, metadata: dict[str, Any]
) -> TrainResult | LinearFitResult | JacobianFitResult:
    """The lens of `spec.kind` made from `tokens`: [sequences, seq_len], saved in `spec.output`."""
    folder = {"output_dir": spec.output, "resume": spec.resume, "overwrite": spec.overwrite, "metadata": metadata}
    # Through the modules, so that tests can replace a kind's function.
    if spec.kind == "jacobian":
        return jacobian_fit.fit_jacobian_lens(view, tokens, dim_batch=spec.dim_batch, **folder)
    if spec.kind == "linear":
        return linear_fit.fit_linear_lens(
            view, tokens, ridge=config.ridge, seed=config.seed, micro_batch=config.batch_size, **folder
        )  # fmt: skip
    return loop.train_lens(view, tokens, config, **folder)


def _jacobian_reading(output: Path, fitted: JacobianFitResult) -> tuple[str, str]:
    """Where the Jacobian lens is, and what it averages over."""
    if fitted.already_fitted:
        return (
            f"{output} already holds the Jacobian lens of this configuration ({fitted.prompts} prompts)",
            "it was left as it is; pass --overwrite --no-resume to fit it again",
        )
    return (
        f"saved the Jacobian lens to {output}: the mean Jacobian over {fitted.prompts} prompts, "
        f"{fitted.seconds:,.0f} s of fitting",
        f"score it beside the logit lens with lenslab eval --lens {output}",
    )


def _linear_reading(output: Path, fitted: LinearFitResult) -> tuple[str, str]:
    """Where the linear lens is, what it was fitted on, and how far each position kept its fit."""
    if fitted.already_fitted:
        return (
            f"{output} already holds the linear lens of this configuration ({fitted.tokens:,} tokens)",
            "it was left as it is; pass --overwrite --no-resume to fit it again",
        )
    kept = "every position kept its full fit (none held out to check it)"
    if fitted.shrinkage is not None:
        shrunk = sum(alpha < 1 for alpha in fitted.shrinkage)
        kept = f"{shrunk} of {len(fitted.shrinkage)} positions shrunk toward the logit lens by held-out KL"
    return (
        f"saved the linear lens to {output}: least squares on {fitted.tokens:,} tokens, {fitted.seconds:,.0f} s of "
        "fitting",
        f"{kept}; score it beside the logit lens with lenslab eval --lens {output}",
    )


def _tuned_reading(output: Path, result: TrainResult, nats_to_bits_per_byte: float) -> tuple[str, str]:
    """Where the tuned lens is and how long it trained; the loss it reached and the layer it fits worst."""
    if result.already_trained:
        steps = result.lens.metadata.get("steps_done")
        return (
            f"{output} already holds the finished lens of this configuration ({steps} steps)",
            "it was left as it is; pass --overwrite --no-resume to train again",
        )
    last = result.history[-1]
    mean_kl = last.loss / len(last.layer_losses)
    worst = max(range(len(last.layer_losses)), key=last.layer_losses.__getitem__)
    return (
        f"saved the tuned lens to {output}: {last.step} steps, {last.tokens:,} tokens, "
        f"{last.elapsed:,.0f} s of training",
        f"final KL to the model {mean_kl:.4f} nats per layer ({mean_kl * nats_to_bits_per_byte:.4f} bits/byte); "
        f"highest at layer {worst} ({last.layer_losses[worst]:.4f})",
    )
