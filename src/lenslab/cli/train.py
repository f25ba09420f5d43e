"""`lenslab train`: fit a tuned lens to a model on text, with the fast recipe by default.

    lenslab train --model gpt2 --data corpus.txt --output lenses/gpt2
    lenslab train --model gpt2 --data corpus.txt --output lenses/gpt2-paper --recipe paper   # the paper's recipe
    torchrun --nproc_per_node 4 -m lenslab train --model gpt2 --output lenses/gpt2   # one GPU per process

The first `--heldout-tokens` of the data are kept out of training (the text `lenslab eval` scores by default);
training reads `--steps` x `--tokens-per-step` tokens after them (or `--init-tokens`, if more) unless
`--train-tokens` says otherwise. The output directory receives `train_log.jsonl` (a record per step), a checkpoint
every `--checkpoint-every` steps and, at the end, the lens (`config.json` + `params.safetensors`); it is locked for
the run, so a second run into it stops at once. Ctrl-C or SIGTERM stops after the step in progress and writes a
checkpoint of it; running the same command again resumes from the last checkpoint. A directory holding another
configuration's run is refused unless `--overwrite`, and a non-empty one that holds no lenslab run too; files
lenslab did not write are never replaced or deleted (`lenslab.train.checkpoints`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lenslab.cli.common import add_data_args, add_model_args, data_spec_from_args, load_model_from_args, positive_int
from lenslab.cli.eval import DEFAULT_TOKENS as EVAL_TOKENS
from lenslab.errors import LensLabError

if TYPE_CHECKING:
    from lenslab.train import TrainResult


def non_negative_int(text: str) -> int:
    """argparse type for token counts that may be zero."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def per_recipe(field: str) -> str:
    """Each built-in recipe's default for a `TrainConfig` setting left at None, e.g. "fast: 60, paper: 250"."""
    from lenslab.train.config import RECIPE_DEFAULTS  # torch-free, so `lenslab --help` stays fast

    return ", ".join(f"{name}: {getattr(defaults, field)}" for name, defaults in RECIPE_DEFAULTS.items())


def register(subparsers: argparse._SubParsersAction) -> None:
    from lenslab.train.config import TrainConfig  # torch-free, so `lenslab --help` stays fast

    # Defaults come from TrainConfig itself, so the flags cannot drift from the library.
    defaults = argparse.Namespace(**{field.name: field.default for field in dataclasses.fields(TrainConfig)})
    parser = subparsers.add_parser(
        "train",
        help="train a tuned lens for a model",
        description="Train a tuned lens (one affine translator per layer) to match the model's own next-token "
        "distribution at every layer: KL(p_final || p_lens) summed over layers, the model frozen. The default "
        "recipe, fast, starts from a closed-form (ridge least-squares) fit and fine-tunes with whitened SGD; "
        "--recipe paper is the tuned lens paper's. Run under torchrun for data parallelism.",
    )
    add_model_args(parser)
    add_data_args(parser)
    parser.add_argument(
        "--output", "-o", type=Path, required=True, metavar="DIR", help="directory for the lens, log and checkpoints"
    )
    parser.add_argument(
        "--train-tokens", type=positive_int, default=None, metavar="N",
        help="training tokens to read (default: --steps x --tokens-per-step, so no text is read twice, or "
        "--init-tokens if that is more)",
    )  # fmt: skip
    parser.add_argument(
        "--heldout-tokens", type=non_negative_int, default=EVAL_TOKENS, metavar="N",
        help="tokens at the start of the data kept out of training, for `lenslab eval` (default: %(default)s)",
    )  # fmt: skip

    group = parser.add_argument_group("training (settings without a default take the recipe's)")
    group.add_argument(
        "--recipe", choices=("fast", "paper"), default=defaults.recipe,
        help="fast: closed-form start, whitened SGD, chunked KL; paper: tuned-lens's recipe (default: %(default)s)",
    )  # fmt: skip
    group.add_argument("--steps", type=int, default=None, help=f"optimiser steps ({per_recipe('steps')})")
    group.add_argument(
        "--tokens-per-step", type=int, default=defaults.tokens_per_step, metavar="N",
        help="tokens per step over all processes (default: %(default)s = 2^18)",
    )  # fmt: skip
    group.add_argument(
        "--batch-size", type=int, default=None, metavar="N",
        help="sequences per forward pass in each process; lower it if memory runs out (default: a power of two "
        "that fits in half the free memory, at most 8192 tokens on CPU, 65536 on GPU)",
    )  # fmt: skip
    group.add_argument(
        "--optimizer", choices=("sgd", "adam", "whitened"), default=None,
        help=f"whitened: SGD on gradients whitened by the closed-form start's statistics ({per_recipe('optimizer')})",
    )  # fmt: skip
    group.add_argument(
        "--lr", type=float, default=None,
        help="effective learning rate (default: 1.0 for sgd, whose momentum gain is divided out; 1e-3 for adam; "
        "30 for whitened)",
    )  # fmt: skip
    group.add_argument(
        "--momentum", type=float, default=defaults.momentum, help="SGD momentum or Adam beta1 (default: %(default)s)"
    )
    group.add_argument(
        "--weight-decay", type=float, default=None,
        help=f"pulls the translators toward the identity ({per_recipe('weight_decay')})",
    )  # fmt: skip
    group.add_argument(
        "--max-grad-norm", type=float, default=defaults.max_grad_norm,
        help="gradients are clipped to this global norm (default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--warmup-steps", type=int, default=None,
        help="linear warm-up steps (sgd: 0; adam: steps/10 in the fast recipe, steps/5 in the paper's)",
    )  # fmt: skip
    group.add_argument(
        "--init-tokens", type=non_negative_int, default=None, metavar="N",
        help=f"tokens for the closed-form start, 0 to start from the logit lens ({per_recipe('init_tokens')})",
    )  # fmt: skip
    group.add_argument(
        "--ridge", type=float, default=defaults.ridge,
        help="ridge penalty of the closed-form start, relative to the residuals' scale (default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--checkpoint-every", type=int, default=defaults.checkpoint_every, metavar="N",
        help="steps between checkpoints, 0 for none (default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--mixed-precision", action=argparse.BooleanOptionalAction, default=defaults.mixed_precision,
        help="bfloat16 where the hardware makes it fast: the fast recipe's vocabulary products on GPUs and CPUs "
        "with AMX or AVX-512 BF16, the paper recipe's lens on GPUs (default: on)",
    )  # fmt: skip
    group.add_argument(
        "--resume", action=argparse.BooleanOptionalAction, default=True,
        help="continue from the checkpoint in --output when it holds one of this configuration (default: on)",
    )  # fmt: skip
    group.add_argument(
        "--overwrite", action="store_true", help="replace a lens or checkpoint of another configuration in --output"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `lenslab --help` does not pay for torch and transformers.
    from lenslab.adapter import ModelView
    from lenslab.data import default_seq_len, prepare_tokens
    from lenslab.train import TrainConfig, init_distributed, shutdown_distributed, train_lens
    from lenslab.train.batches import sequences_per_step
    from lenslab.train.checkpoints import CHECKPOINT_DIR, STATE_FILE, own_output
    from lenslab.train.distributed import Processes
    from lenslab.train.loop import TrainingInterrupted

    # Settings are checked before anything is loaded.
    config = TrainConfig(
        steps=args.steps, tokens_per_step=args.tokens_per_step, batch_size=args.batch_size, recipe=args.recipe,
        optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, warmup_steps=args.warmup_steps, init_tokens=args.init_tokens,
        ridge=args.ridge, seed=args.seed,
        checkpoint_every=args.checkpoint_every, mixed_precision=args.mixed_precision,
    )  # fmt: skip
    if args.device_map is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LensLabError(
            "--device-map spreads one model over all devices, while torchrun runs one copy per device; run lenslab "
            "train without torchrun or drop --device-map."
        )
    device = init_distributed(args.device)
    processes = Processes.current()
    try:
        # Held from before the model loads, so that a folder in use or not lenslab's is refused at once.
        with own_output(args.output, overwrite=args.overwrite) if processes.is_main else contextlib.nullcontext():
            loaded = load_model_from_args(args, device=device)
            view = ModelView.from_model(loaded.model)
            seq_len = args.seq_len or default_seq_len(loaded.model, loaded.tokenizer)
            per_step = sequences_per_step(config.tokens_per_step, seq_len, processes.world_size)
            # By default exactly the tokens the steps read, so that no sequence is read twice, unless the closed-form
            # start asks for more (it would be cut to what the data holds).
            step_tokens = config.effective_steps * per_step * seq_len
            train_tokens = args.train_tokens or max(step_tokens, config.effective_init_tokens)
            data = prepare_tokens(
                data_spec_from_args(args), loaded.tokenizer, train_tokens=train_tokens,
                heldout_tokens=args.heldout_tokens, seq_len=seq_len, seed=args.seed, model=loaded.model,
            )  # fmt: skip
            metadata = {
                "model": args.model,
                "model_revision": args.revision,
                "data": {
                    "source": data.source, "seq_len": data.seq_len, "train_sequences": len(data.train),
                    "heldout_tokens": args.heldout_tokens, "bytes_per_token": data.bytes_per_token,
                },
            }  # fmt: skip
            result = train_lens(
                view, data.train, config, output_dir=args.output, resume=args.resume, overwrite=args.overwrite,
                metadata=metadata,
            )  # fmt: skip
    except TrainingInterrupted as stopped:
        if processes.is_main:
            print(f"lenslab train: {stopped}", file=sys.stderr)
        return 128 + stopped.signum
    except KeyboardInterrupt:  # before training began, or a second Ctrl-C during it
        if processes.is_main:
            if (args.output / CHECKPOINT_DIR / STATE_FILE).is_file():
                where = f"run the same command again to resume from the checkpoint in {args.output / CHECKPOINT_DIR}"
            else:
                where = "no checkpoint was written, so running the same command again starts over"
            print(f"lenslab train: interrupted; {where}.", file=sys.stderr)
        return 130
    finally:
        shutdown_distributed()
    if processes.is_main:
        print(_summary(args.output, result, data.nats_to_bits_per_byte))
    return 0


def _summary(output: Path, result: TrainResult, nats_to_bits_per_byte: float) -> str:
    """One line on the finished run: where the lens is, how long it trained and the loss it reached."""
    if result.already_trained:
        steps = result.lens.metadata.get("steps_done")
        return (
            f"{output} already holds the finished lens of this configuration ({steps} steps); pass --overwrite "
            "--no-resume to train again."
        )
    last = result.history[-1]
    mean_kl = last.loss / len(last.layer_losses)
    return (
        f"Saved the tuned lens to {output}: {last.step} steps, {last.tokens:,} tokens, final loss {last.loss:.4f} "
        f"nats ({mean_kl:.4f} per layer, {mean_kl * nats_to_bits_per_byte:.4f} bits/byte), "
        f"{last.elapsed:,.0f} s of training."
    )
