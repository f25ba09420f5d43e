"""Training tuned lenses, `train_lens(view, tokens, TrainConfig(...))`, and fitting the other kinds.

The package follows the pieces of a run, each readable alone:

    config.py        TrainConfig: every setting, and what each recipe (fast, the default, or paper) fills in
    batches.py       which sequences each step reads, a function of (seed, step), and how many fit in memory at once
    closed_form.py   the fast recipe's start: each translator fitted by ridge least squares, shrunk toward the
                     identity where held-out tokens decode better with less of it
    objective.py     KL(p_final || p_lens) summed over positions, back-propagated one position at a time or
                     through chunked_kl.py: all positions at once, the vocabulary in chunks of tokens, bfloat16,
                     through the model's own head as the adapter exposes it (native_kl.py: its CPU kernel)
    whitened_sgd.py  the fast recipe's optimiser: SGD on gradients whitened by the closed-form statistics
    recipes.py       start, objective, optimiser, learning-rate schedule and update (pluggable: RECIPES)
    distributed.py   torchrun data parallelism: each process a share of every step, gradients averaged
    checkpoints.py   what the output directory holds, resume and refusal to overwrite
    stopping.py      what stops a run early: divergence, SIGINT and SIGTERM
    loop.py          train_lens, tying them together
    linear_fit.py    the linear lens (`--kind linear`): the closed-form start alone, kept as a lens
    jacobian_fit.py  the Jacobian lens (`--kind jacobian`): mean Jacobians over prompts, checkpointed
    run.py           one `lenslab train` run from its specs: model, tokens per kind, the lens, its reading

>>> from lenslab import load_model, ModelView                         # doctest: +SKIP
>>> from lenslab.data import DataSpec, prepare_tokens                  # doctest: +SKIP
>>> model, tokenizer = load_model("gpt2")                              # doctest: +SKIP
>>> data = prepare_tokens(DataSpec("corpus.txt"), tokenizer, train_tokens=2**22, heldout_tokens=2**16)  # doctest: +SKIP
>>> config = TrainConfig(steps=16, tokens_per_step=2**18)                # doctest: +SKIP
>>> result = train_lens(ModelView.from_model(model), data.train, config)  # doctest: +SKIP
"""

from importlib import import_module

# Public name -> module, imported on first use so that the CLI can read `TrainConfig`'s defaults without torch.
_PUBLIC = {
    "TrainConfig": "lenslab.train.config",
    "StepRecord": "lenslab.train.loop",
    "TrainResult": "lenslab.train.loop",
    "train_lens": "lenslab.train.loop",
    "init_distributed": "lenslab.train.distributed",
    "shutdown_distributed": "lenslab.train.distributed",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'lenslab.train' has no attribute {name!r}")
