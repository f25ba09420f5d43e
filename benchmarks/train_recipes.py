"""Benchmark lens quality per training token: the fast recipe against the paper's, and each lever alone.

    python benchmarks/train_recipes.py --output recipes.json                 # reference, paper 1/4, fast 1/4
    python benchmarks/train_recipes.py --runs ablations --output abl.json     # each lever of the fast recipe

The reference is the paper's recipe (`--recipe paper`: zero start, SGD with Nesterov momentum, lr 1, weight decay
1e-3, clipping, linear decay) at a "full" budget of `--steps` x `--tokens-per-step` tokens, scaled down from the
paper's 250 x 2^18 to fit a small CPU. Every other run gets a quarter of those tokens, counting the tokens the
closed-form start reads (`--init-tokens`) as well as the steps' (the steps re-read the start's sequences, so they
also count twice). Runs (`--runs`, comma-separated names or groups):

    main        reference (paper, full budget), paper-quarter, fast-quarter, fast-quarter-own-data
    ablations   closed-form-only, fast-adam, fast-sgd, fast-muon, zero-start-adam, fast-lr10, fast-lr100,
                fast-float32
    cache       fast-quarter, fast-quarter-half-data (a pool of an eighth of the reference budget, so every
                sequence is read twice), and each again with -cached: residuals kept after a sequence's first
                forward (`ResidualCache`)

All runs read one pool of training text, prepared for the full budget, in their own seeded order; the exception,
fast-quarter-own-data, reads a pool prepared for a quarter of the budget (the first documents after the held-out
ones, less varied), so that its data is no richer than its token count. Each lens is then scored by
`lenslab.evaluate` on held-out text: KL(p_final || p_lens) at every lens position 0..L-1 and its mean. Seconds are
those of `train_lens` (closed-form start included), in this process, one run after another.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from lenslab.adapter import ModelView
from lenslab.data import DataSpec, prepare_tokens
from lenslab.evaluate import evaluate_lenses
from lenslab.lenses import LogitLens, TunedLens
from lenslab.loading import load_model
from lenslab.residuals import Residuals
from lenslab.train import TrainConfig, train_lens
from lenslab.train.batches import choose_micro_batch, step_indices
from lenslab.train.closed_form import fit_closed_form
from lenslab.train.config import RECIPE_DEFAULTS
from lenslab.train.distributed import Processes
from lenslab.train.recipes import RECIPES, FastRecipe, linear_schedule

GROUPS = {
    "main": ["reference", "paper-quarter", "fast-quarter", "fast-quarter-own-data"],
    "ablations": [
        "closed-form-only", "fast-adam", "fast-sgd", "fast-muon", "zero-start-adam", "fast-lr10", "fast-lr100",
        "fast-float32",
    ],
    "cache": ["fast-quarter", "fast-quarter-cached", "fast-quarter-half-data", "fast-quarter-half-data-cached"],
}  # fmt: skip
CACHED_SUFFIX = "-cached"
"""Runs whose name ends so read each sequence's residuals from `ResidualCache` after its first forward."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="/work/shared/models/austen-gpt2-6l", help="local model directory")
    parser.add_argument("--data", default="/work/shared/data/austen.txt", help="text file")
    parser.add_argument("--steps", type=int, default=32, help="reference steps (default: %(default)s)")
    parser.add_argument("--tokens-per-step", type=int, default=4096, help="(default: %(default)s)")
    parser.add_argument(
        "--init-tokens", type=int, default=8192, help="closed-form start of the fast runs (default: %(default)s)"
    )
    parser.add_argument(
        "--quarter-tokens-per-step", type=int, default=1024,
        help="tokens per step of the fast quarter-budget runs (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--seq-len", type=int, default=256, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: %(default)s)")
    parser.add_argument("--heldout-tokens", type=int, default=8192, help="tokens scored (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--runs", default="main", help="run names or groups, comma-separated (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    return parser.parse_args(argv)


class _Both:
    """Muon for the square matrices and Adam for the biases, stepped together (the loop needs one optimiser)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers
        self.param_groups = [group for optimizer in optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


class MuonRecipe(FastRecipe):
    """The fast recipe with torch.optim.Muon (Newton-Schulz orthogonalised momentum) on the translator matrices
    and Adam on their biases, warm-up and linear decay: the optimiser tuned-lens's maintainers report converging
    faster. Its lr is Adam's; Muon's is matched to it by `adjust_lr_fn="match_rms_adamw"`."""

    name = "fast-muon"

    def build_optimizer(self, params):
        matrices, vectors = [p for p in params if p.ndim == 2], [p for p in params if p.ndim != 2]
        lr = self.learning_rate(0)
        muon = torch.optim.Muon(matrices, lr=lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
        return _Both(muon, torch.optim.Adam(vectors, lr=lr))

    def learning_rate(self, step):
        config = self.config
        warmup = max(1, config.effective_steps // 10)
        return config.effective_lr * linear_schedule(step, config.effective_steps, warmup)


class ResidualCache:
    """`ModelView.capture` memoised per sequence: the "cache residuals, so several epochs cost one model pass" lever,
    kept in memory here (the Austen model's residuals are 7 KiB per token) where a real run would keep them on
    disk. It stands in for `view.capture` (installed on the instance), serving the sequences it has seen from the
    cache and running the model on the rest only."""

    def __init__(self, view: ModelView):
        self.view = view
        self.capture = view.capture
        self.residuals: dict[bytes, list[torch.Tensor]] = {}
        self.forwarded = 0
        """Sequences the model actually ran on."""

    def __call__(self, input_ids, attention_mask=None, *, positions=None, need_logits=True):
        if need_logits or positions is not None:
            raise ValueError("ResidualCache serves the fast recipe's captures: all positions, no logits.")
        keys = [row.numpy().tobytes() for row in input_ids]
        missing = [i for i, key in enumerate(keys) if key not in self.residuals]
        if missing:
            mask = None if attention_mask is None else attention_mask[missing]
            fresh = self.capture(input_ids[missing], mask, need_logits=False).hidden
            for j, i in enumerate(missing):
                self.residuals[keys[i]] = [h[j].clone() for h in fresh]
            self.forwarded += len(missing)
        hidden = [torch.stack([self.residuals[key][p] for key in keys]) for p in range(self.view.num_positions)]
        return Residuals(hidden=hidden, logits=None)


def configs(args: argparse.Namespace) -> dict[str, TrainConfig]:
    """The training settings of every run."""
    full = args.steps * args.tokens_per_step
    quarter_steps = (full // 4 - args.init_tokens) // args.quarter_tokens_per_step
    common = {"batch_size": args.batch_size, "checkpoint_every": 0}
    fast = {
        "recipe": "fast", "steps": quarter_steps, "tokens_per_step": args.quarter_tokens_per_step,
        "init_tokens": args.init_tokens, **common,
    }  # fmt: skip
    return {
        "reference": TrainConfig(recipe="paper", steps=args.steps, tokens_per_step=args.tokens_per_step, **common),
        "paper-quarter": TrainConfig(
            recipe="paper", steps=args.steps // 4, tokens_per_step=args.tokens_per_step, **common
        ),
        "fast-quarter": TrainConfig(**fast),
        "fast-quarter-own-data": TrainConfig(**fast),
        "fast-quarter-cached": TrainConfig(**fast),
        "fast-quarter-half-data": TrainConfig(**fast),
        "fast-quarter-half-data-cached": TrainConfig(**fast),
        "closed-form-only": TrainConfig(**fast),  # only its init_tokens are used, see `closed_form_only`
        "fast-adam": TrainConfig(**fast, optimizer="adam"),
        "fast-sgd": TrainConfig(**fast, optimizer="sgd", lr=3.0),
        "fast-muon": TrainConfig(**{**fast, "recipe": "fast-muon"}, lr=1e-3),
        "zero-start-adam": TrainConfig(
            **{**fast, "init_tokens": 0, "steps": full // 4 // args.quarter_tokens_per_step}, optimizer="adam"
        ),
        "fast-lr10": TrainConfig(**fast, lr=10.0),
        "fast-lr100": TrainConfig(**fast, lr=100.0),
        "fast-float32": TrainConfig(**fast, mixed_precision=False),
    }


def closed_form_only(view: ModelView, tokens: torch.Tensor, config: TrainConfig) -> TunedLens:
    """The closed-form start alone, on the sequences the fast runs start from."""
    lens = TunedLens.from_model(view)
    count = -(-config.effective_init_tokens // tokens.shape[1])
    indices = step_indices(0, count, len(tokens), config.seed)
    micro_batch = config.batch_size or choose_micro_batch(view, tokens.shape[1], chunked=True)
    fit_closed_form(view, lens, tokens[indices], micro_batch, config.ridge, Processes())
    return lens


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    RECIPES[MuonRecipe.name] = MuonRecipe
    RECIPE_DEFAULTS[MuonRecipe.name] = RECIPE_DEFAULTS["fast"]
    names = [name for item in args.runs.split(",") for name in GROUPS.get(item, [item])]
    settings = configs(args)
    model, tokenizer = load_model(args.model, dtype="float32", device="cpu")
    view = ModelView.from_model(model)
    full = args.steps * args.tokens_per_step

    def data(train_tokens: int):
        return prepare_tokens(
            DataSpec(args.data), tokenizer, train_tokens=train_tokens, heldout_tokens=args.heldout_tokens,
            seq_len=args.seq_len, seed=0,
        )  # fmt: skip

    pool, own, half = data(full), data(full // 4), data(full // 8)
    lenses, runs = {"logit lens": LogitLens(view)}, {}
    for name in names:
        config = settings[name]
        base_name = name.removesuffix(CACHED_SUFFIX)
        tokens = {"fast-quarter-own-data": own.train, "fast-quarter-half-data": half.train}.get(base_name, pool.train)
        cache = ResidualCache(view) if name.endswith(CACHED_SUFFIX) else None
        if cache is not None:
            view.capture = cache
        started = time.perf_counter()
        try:
            if name == "closed-form-only":
                lens, read = closed_form_only(view, tokens, config), config.effective_init_tokens
            else:
                result = train_lens(view, tokens, config, progress=False)
                lens, read = result.lens, result.init_tokens + result.history[-1].tokens
        finally:
            if cache is not None:
                del view.capture  # back to the class's method
        seconds = time.perf_counter() - started
        lenses[name] = lens
        runs[name] = {"tokens": read, "seconds": seconds, "config": config.fingerprint(), "pool_tokens": tokens.numel()}
        if cache is not None:
            runs[name]["forwarded_tokens"] = cache.forwarded * tokens.shape[1]
        note = f", the model ran on {runs[name]['forwarded_tokens']}" if cache is not None else ""
        print(f"{name}: {read} tokens in {seconds:.1f} s{note}", flush=True)
    result = evaluate_lenses(view, lenses, pool.heldout, batch_size=args.batch_size)
    kl = {name: metrics.kl[: view.num_layers] for name, metrics in result.lenses.items()}

    reference = kl.get("reference")
    print(
        f"\nreference budget {args.steps} x {args.tokens_per_step} = {full} tokens; others at most {full // 4}; "
        f"held-out KL over {result.tokens} tokens; {args.threads} thread(s)"
    )
    print(f"{'run':<24} {'tokens':>7} {'seconds':>7} {'tok/s':>6} {'mean KL':>8} {'x ref':>6}  KL per position 0..L-1")
    for name, layers in kl.items():
        run = runs.get(name)
        timing = f"{run['tokens']:7d} {run['seconds']:7.1f} {run['tokens'] / run['seconds']:6.0f}" if run else " " * 22
        mean = sum(layers) / len(layers)
        ratio = f"{mean / (sum(reference) / len(reference)):6.3f}" if reference else " " * 6
        print(f"{name:<24} {timing} {mean:8.4f} {ratio}  " + " ".join(f"{value:.4f}" for value in layers))
    if args.output:
        record = {
            "date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "settings": {key: str(value) for key, value in vars(args).items()},
            "runs": runs, "heldout_kl": kl, "heldout_tokens": result.tokens,
        }  # fmt: skip
        args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
