"""`lenslab train`: fit a tuned lens to a model on text, with the fast recipe by default.

    lenslab train --model gpt2 --data corpus.txt --output lenses/gpt2
    lenslab train --model gpt2 --data corpus.txt --output lenses/gpt2-paper --recipe paper   # the paper's recipe
    torchrun --nproc_per_node 4 -m lenslab train --model gpt2 --output lenses/gpt2   # one GPU per process
    lenslab train --kind jacobian --model gpt2 --data corpus.txt --seq-len 128 --output lenses/gpt2-jacobian

The first `--heldout-tokens` of the data are kept out of training (the text `lenslab eval` scores by default);
training reads `--steps` x `--tokens-per-step` tokens after them (or `--init-tokens`, if more) unless
`--train-tokens` says otherwise. The output directory receives `train_log.jsonl` (a record per step), a checkpoint
every `--checkpoint-every` steps and, at the end, the lens (`config.json` + `params.safetensors`); it is locked for
the run, so a second run into it stops at once. Ctrl-C or SIGTERM stops after the step in progress and writes a
checkpoint of it; running the same command again resumes from the last checkpoint. A directory holding another
configuration's run is refused unless `--overwrite`, and a non-empty one that holds no lenslab run too; files
lenslab did not write are never replaced or deleted (`lenslab.train.checkpoints`). `--kind jacobian` fits the
Jacobian lens instead (`lenslab.train.jacobian_fit`), with the same folder rules, checkpoints and resumption.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING

from lenslab.cli import console
from lenslab.cli.flags import MODEL, TEXT, Command, Spec
from lenslab.errors import LensLabError
from lenslab.specs import positive_int, whole_number

if TYPE_CHECKING:
    from lenslab.specs import ModelSpec, TextSpec, TrainSpec
    from lenslab.train import TrainConfig, TrainResult
    from lenslab.train.jacobian_fit import JacobianFitResult


def run(model: ModelSpec, text: TextSpec, config: TrainConfig, spec: TrainSpec) -> int:
    # Imported here so that `lenslab --help` does not pay for torch and transformers.
    from lenslab.adapter import ModelView
    from lenslab.train import init_distributed, shutdown_distributed, train_lens
    from lenslab.train.batches import sequences_per_step
    from lenslab.train.checkpoints import CHECKPOINT_DIR, STATE_FILE, own_output
    from lenslab.train.distributed import Processes
    from lenslab.train.jacobian_fit import fit_jacobian_lens
    from lenslab.train.stopping import TrainingInterrupted

    if spec.kind == "jacobian" and text.seq_len is not None:
        from lenslab.jacobian import check_prompt_length

        check_prompt_length(text.seq_len)  # before the model loads
    if model.device_map is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LensLabError(
            "--device-map spreads one model over all devices, while torchrun runs one copy per device; run lenslab "
            "train without torchrun or drop --device-map."
        )
    device = init_distributed(model.device)
    processes = Processes.current()
    try:
        # Held from before the model loads, so that a folder in use or not lenslab's is refused at once.
        with own_output(spec.output, overwrite=spec.overwrite) if processes.is_main else contextlib.nullcontext():
            loaded = model.load(device=device)
            view = ModelView.from_model(loaded.model)
            seq_len = text.chunk_length(loaded)
            per_step = sequences_per_step(config.tokens_per_step, seq_len, processes.world_size)
            # By default exactly the tokens the steps read, so that no sequence is read twice, unless the closed-form
            # start asks for more (it would be cut to what the data holds).
            if spec.kind == "jacobian":
                train_tokens = spec.train_tokens or JACOBIAN_PROMPTS * seq_len
            else:
                step_tokens = config.effective_steps * per_step * seq_len
                train_tokens = spec.train_tokens or max(step_tokens, config.effective_init_tokens)
            data = text.tokens(loaded, heldout=spec.heldout_tokens, train=train_tokens, seq_len=seq_len)
            metadata = {
                "model": model.model,
                "model_revision": model.revision,
                "data": {
                    "source": data.source, "seq_len": data.seq_len, "train_sequences": len(data.train),
                    "heldout_tokens": spec.heldout_tokens, "bytes_per_token": data.bytes_per_token,
                },
            }  # fmt: skip
            if spec.kind == "jacobian":
                fitted = fit_jacobian_lens(
                    view, data.train, dim_batch=spec.dim_batch, output_dir=spec.output, resume=spec.resume,
                    overwrite=spec.overwrite, metadata=metadata,
                )  # fmt: skip
            else:
                result = train_lens(
                    view, data.train, config, output_dir=spec.output, resume=spec.resume, overwrite=spec.overwrite,
                    metadata=metadata,
                )  # fmt: skip
    except TrainingInterrupted as stopped:
        if processes.is_main:
            print(f"lenslab train: {stopped}", file=sys.stderr)
        return 128 + stopped.signum
    except KeyboardInterrupt:  # before training began, or a second Ctrl-C during it
        if processes.is_main:
            if (spec.output / CHECKPOINT_DIR / STATE_FILE).is_file():
                where = f"run the same command again to resume from the checkpoint in {spec.output / CHECKPOINT_DIR}"
            else:
                where = "no checkpoint was written, so running the same command again starts over"
            print(f"lenslab train: interrupted; {where}.", file=sys.stderr)
        return 130
    finally:
        shutdown_distributed()
    if processes.is_main:
        if spec.kind == "jacobian":
            console.conclude([], jacobian_reading(spec, fitted))
        else:
            console.conclude([], reading(spec, result, data.nats_to_bits_per_byte))
    return 0


def jacobian_reading(spec: TrainSpec, fitted: JacobianFitResult) -> tuple[str, str]:
    """Where the Jacobian lens is, and what it averages over."""
    if fitted.already_fitted:
        return (
            f"{spec.output} already holds the Jacobian lens of this configuration ({fitted.prompts} prompts)",
            "it was left as it is; pass --overwrite --no-resume to fit it again",
        )
    return (
        f"saved the Jacobian lens to {spec.output}: the mean Jacobian over {fitted.prompts} prompts, "
        f"{fitted.seconds:,.0f} s of fitting",
        f"score it beside the logit lens with lenslab eval --lens {spec.output}",
    )


def reading(spec: TrainSpec, result: TrainResult, nats_to_bits_per_byte: float) -> tuple[str, str]:
    """Where the lens is and how long it trained; the loss it reached and the layer it fits worst."""
    if result.already_trained:
        steps = result.lens.metadata.get("steps_done")
        return (
            f"{spec.output} already holds the finished lens of this configuration ({steps} steps)",
            "it was left as it is; pass --overwrite --no-resume to train again",
        )
    last = result.history[-1]
    mean_kl = last.loss / len(last.layer_losses)
    worst = max(range(len(last.layer_losses)), key=last.layer_losses.__getitem__)
    return (
        f"saved the tuned lens to {spec.output}: {last.step} steps, {last.tokens:,} tokens, "
        f"{last.elapsed:,.0f} s of training",
        f"final KL to the model {mean_kl:.4f} nats per layer ({mean_kl * nats_to_bits_per_byte:.4f} bits/byte); "
        f"highest at layer {worst} ({last.layer_losses[worst]:.4f})",
    )


JACOBIAN_PROMPTS = 100
"""Prompts a Jacobian lens averages over by default: about 100 of 128 tokens already serve (Gurnee et al.)."""
COUNT = {"type": whole_number, "metavar": "N"}
COMMANDS = [
    Command(
        "train", "train a tuned lens for a model",
        "Train a tuned lens (one affine translator per layer) to match the model's own next-token distribution at "
        "every layer: KL(p_final || p_lens) summed over layers, the model frozen. The default recipe, fast, starts "
        "from a closed-form (ridge least-squares) fit and fine-tunes with whitened SGD; --recipe paper is the tuned "
        "lens paper's (SGD with Nesterov momentum from the logit lens). --kind jacobian fits the Jacobian lens instead "
        "(no training; the training settings do not apply). Run under torchrun for data parallelism.",
        (
            MODEL, TEXT,
            Spec("lenslab.train.config:TrainConfig", "training (settings whose default is the recipe's say so)",
                 flags={"tokens_per_step": {"type": positive_int, "metavar": "N"}, "init_tokens": COUNT,
                        "batch_size": {"type": positive_int, "metavar": "N"}}),
            Spec("lenslab.specs:TrainSpec", "run", flags={
                "output": {"names": ("--output", "-o"), "metavar": "DIR"},
                "train_tokens": {"type": positive_int, "metavar": "N"}, "heldout_tokens": COUNT,
                "dim_batch": {"type": positive_int, "metavar": "N"},
            }),
        ),
        run,
    )
]  # fmt: skip
