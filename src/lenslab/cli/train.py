"""`lenslab train`: make a lens for a model from text: tuned (the default, the fast recipe), linear or Jacobian.

    lenslab train --model gpt2 --data corpus.txt --output lenses/gpt2
    lenslab train --model gpt2 --data corpus.txt --output lenses/gpt2-paper --recipe paper   # the paper's recipe
    torchrun --nproc_per_node 4 -m lenslab train --model gpt2 --output lenses/gpt2   # one GPU per process
    lenslab train --kind linear --model gpt2 --data corpus.txt --output lenses/gpt2-linear
    lenslab train --kind jacobian --model gpt2 --data corpus.txt --seq-len 128 --output lenses/gpt2-jacobian

The first `--heldout-tokens` of the data are kept out of training (the text `lenslab eval` scores by default). The
output directory receives the lens (`config.json` + `params.safetensors`) and, for the kinds that take steps or
prompts, `train_log.jsonl` and checkpoints; it is locked for the run, a directory holding another configuration's run
is refused unless `--overwrite`, and files lenslab did not write are never replaced or deleted
(`lenslab.train.checkpoints`). Ctrl-C or SIGTERM stops after the step in progress and writes a checkpoint of it;
running the same command again resumes. What each kind reads and does: `lenslab.train.run`.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from lenslab.cli import console
from lenslab.cli.flags import MODEL, TEXT, Command, Spec
from lenslab.specs import positive_int, whole_number

if TYPE_CHECKING:
    from lenslab.command_specs import TrainSpec
    from lenslab.specs import ModelSpec, TextSpec
    from lenslab.train import TrainConfig


def run(model: ModelSpec, text: TextSpec, config: TrainConfig, spec: TrainSpec) -> int:
    from lenslab.train.run import run_training  # here, so that `lenslab --help` does not pay for torch

    done = run_training(model, text, config, spec)
    if done.stopped is not None:
        if done.reports:
            print(f"lenslab train: {done.stopped}", file=sys.stderr)
        return 128 + done.stopped.signum
    if done.reports:
        console.conclude([], done.reading())
    return 0


COUNT = {"type": whole_number, "metavar": "N"}
COMMANDS = [
    Command(
        "train", "make a tuned, linear or Jacobian lens for a model",
        "Train a tuned lens (one affine translator per layer) to match the model's own next-token distribution at "
        "every layer: KL(p_final || p_lens) summed over layers, the model frozen. The default recipe, fast, starts "
        "from a closed-form (ridge least-squares) fit and fine-tunes with whitened SGD; --recipe paper is the tuned "
        "lens paper's (SGD with Nesterov momentum from the logit lens). --kind linear keeps that closed-form fit "
        "alone, with no training step (Din et al. 2023; of the training settings only --ridge, --seed and "
        "--batch-size apply, and it reads 65,536 tokens unless --train-tokens says otherwise). --kind jacobian fits "
        "the Jacobian lens instead (no training; the training settings do not apply). Run under torchrun for data "
        "parallelism.",
        (
            MODEL, TEXT,
            Spec("lenslab.train.config:TrainConfig", "training (settings whose default is the recipe's say so)",
                 flags={"tokens_per_step": {"type": positive_int, "metavar": "N"}, "init_tokens": COUNT,
                        "batch_size": {"type": positive_int, "metavar": "N"}}),
            Spec("lenslab.command_specs:TrainSpec", "run", flags={
                "output": {"names": ("--output", "-o"), "metavar": "DIR"},
                "train_tokens": {"type": positive_int, "metavar": "N"}, "heldout_tokens": COUNT,
                "dim_batch": {"type": positive_int, "metavar": "N"},
            }),
        ),
        run,
    )
]  # fmt: skip
