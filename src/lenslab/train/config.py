"""`TrainConfig`: every setting of a tuned-lens training run, and the two recipes' defaults.

Two recipes (`TrainConfig.recipe`) share every setting but resolve the ones left at None differently:

- "fast" (the default): a closed-form start (each translator the ridge least-squares map from its layer's
  residual to the last one, `lenslab.train.closed_form`), then SGD on gradients whitened by the residuals' second
  moment (`lenslab.train.whitened_sgd`) on the KL, whose vocabulary-wide part runs in chunks of tokens, in
  bfloat16 where the hardware multiplies it fast (`lenslab.train.chunked_kl`); 60 steps, under a quarter of the
  paper's tokens. `docs/benchmarks.md` has the measurements that chose it.
- "paper": the tuned lens paper's recipe (Belrose et al. 2023) as its code published it (tuned-lens 0.2.0,
  `scripts/train_loop.py` and `scripts/ingredients.py`): a zero start, 250 steps of 2^18 tokens, SGD with Nesterov
  momentum 0.9 at an effective learning rate of 1, weight decay 1e-3, gradient clipping at global norm 1, and a
  linear decay of the learning rate to 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from lenslab.errors import LensLabError


class RecipeDefaults(NamedTuple):
    """What a recipe (`lenslab.train.recipes.Recipe`) uses for the `TrainConfig` settings left at None."""

    steps: int
    """`TrainConfig.steps`."""
    optimizer: str
    """`TrainConfig.optimizer`."""
    weight_decay: float
    """`TrainConfig.weight_decay`."""
    init_tokens: int
    """`TrainConfig.init_tokens`: 0 for no closed-form start."""
    warmup_fraction: float
    """Warm-up steps as a fraction of the steps (at most 1000) when the optimiser is Adam; SGD never warms up."""


RECIPE_DEFAULTS = {
    # No weight decay in the fast recipe: it would pull the closed-form start back toward the logit lens.
    "fast": RecipeDefaults(steps=60, optimizer="whitened", weight_decay=0.0, init_tokens=2**16, warmup_fraction=0.1),
    "paper": RecipeDefaults(steps=250, optimizer="sgd", weight_decay=1e-3, init_tokens=0, warmup_fraction=0.2),
}
"""Every recipe's defaults, by `TrainConfig.recipe`: the names `TrainConfig` accepts. Here, torch-free, for the CLI;
`lenslab.train.recipes.RECIPES` holds the recipes' code under the same names, and a new recipe adds itself to both."""

DEFAULT_LR = {"sgd": 1.0, "adam": 1e-3, "whitened": 30.0}
"""Effective learning rate per optimiser when `lr` is None (tuned-lens's for SGD and Adam; whitened: measured in
`docs/benchmarks.md`, where 10 to 100 all beat Adam; 100 did a little better than 30 there but moves the lens
further on rounding noise, see `lenslab.train.whitened_sgd.DAMPING`)."""

# Fields that change only speed or memory, never the lens: a run may resume with other values.
NOT_IN_FINGERPRINT = ("batch_size", "checkpoint_every")


def flag(field_name: str) -> str:
    """The `lenslab train` flag that sets a `TrainConfig` field, e.g. `tokens_per_step` -> `--tokens-per-step`."""
    return "--" + field_name.replace("_", "-")


@dataclass
class TrainConfig:
    """Settings of `train_lens`; each field is also a `lenslab train` flag (see `flag`)."""

    steps: int | None = None
    """Optimiser steps; the learning rate decays linearly to 0 over them. None: the recipe's (fast 60, paper 250)."""
    tokens_per_step: int = 2**18
    """Tokens per optimiser step, over all processes; rounded to whole sequences (a multiple of the process count)."""
    batch_size: int | None = None
    """Sequences per forward pass (micro-batch) in each process; gradient accumulation fills `tokens_per_step`.
    None: the largest power of two that fits in half the device's free memory by an estimate, within 8192 tokens
    on CPU and 65536 on GPU, and at least one (`lenslab.train.batches.choose_micro_batch`). Lower it when memory
    runs out."""
    recipe: Literal["fast", "paper"] = "fast"
    """"fast" (closed-form start, whitened SGD, chunked KL) or "paper" (tuned-lens's recipe); see this module's
    docstring."""
    optimizer: Literal["sgd", "adam", "whitened"] | None = None
    """SGD with Nesterov momentum; Adam (beta2 0.999; AMSGrad in the paper recipe, as tuned-lens has it); or
    "whitened", SGD with Nesterov momentum on gradients whitened by the closed-form start's input statistics (needs
    `init_tokens` above 0). None: the recipe's (fast whitened, paper SGD)."""
    lr: float | None = None
    """Effective learning rate; None for 1.0 with SGD, 1e-3 with Adam, 30 whitened. For SGD (whitened or not) the
    optimiser receives lr * (1 - momentum), undoing the 1 / (1 - momentum) gain of PyTorch's momentum."""
    momentum: float = 0.9
    """SGD momentum, or Adam's beta1."""
    weight_decay: float | None = None
    """L2 penalty on the translators; since they are residual (h + A h + b) it pulls the lens toward the logit lens.
    None: the recipe's (fast 0, paper 1e-3)."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm before each step."""
    warmup_steps: int | None = None
    """Steps of linear learning-rate warm-up; None for 0 with SGD, and with Adam min(1000, steps // 5) in the paper
    recipe and min(1000, steps // 10) in the fast one."""
    init_tokens: int | None = None
    """Tokens read for the closed-form start (ridge least squares; 0: start from the logit lens, as the paper does),
    the first sequences of the run's reading order, so the steps read them again; one sequence in eight of them (at
    least one of two) is held out to shrink each position's fit toward the logit lens where that decodes better
    (`lenslab.train.closed_form`). None: the recipe's (fast 2^16, paper 0). A lens passed to `train_lens` is
    overwritten by the closed-form start unless this is 0."""
    ridge: float = 1e-4
    """Ridge penalty of the closed-form start, relative to the mean squared residual (see
    `lenslab.train.closed_form`); raise it if the start is singular for lack of tokens."""
    seed: int = 0
    """Seeds the order in which training sequences are read: the batch of step s is a function of (seed, s)."""
    checkpoint_every: int = 50
    """Steps between checkpoints in the output directory (0: none); a killed run resumes from the last one."""
    mixed_precision: bool = True
    """Use bfloat16 where it is fast and safe: in the fast recipe the vocabulary-wide products of the KL on CUDA
    devices and CPUs with native bfloat16 (AMX or AVX-512 BF16) arithmetic (see `lenslab.train.chunked_kl`); in
    the paper recipe a bfloat16 autocast of the lens on CUDA. The target distribution stays float32."""

    def __post_init__(self) -> None:
        for name in ("steps", "tokens_per_step", "batch_size", "lr", "max_grad_norm"):
            value = getattr(self, name)  # None (steps, batch_size, lr) means "choose for me"
            if value is not None and not value > 0:
                raise LensLabError(f"{flag(name)} is {value}, but it must be positive; pass a value above 0.")
        if self.optimizer is not None and self.optimizer not in DEFAULT_LR:
            raise LensLabError(
                f"Unknown optimizer {self.optimizer!r}; pass {flag('optimizer')} {' or '.join(DEFAULT_LR)}."
            )
        if self.recipe not in RECIPE_DEFAULTS:
            raise LensLabError(f"Unknown recipe {self.recipe!r}; pass {flag('recipe')} {' or '.join(RECIPE_DEFAULTS)}.")
        if not 0 <= self.momentum < 1:
            raise LensLabError(f"{flag('momentum')} is {self.momentum}, but it must lie in [0, 1); pass e.g. 0.9.")
        for name in ("weight_decay", "init_tokens", "ridge"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise LensLabError(f"{flag(name)} is {value}, but it cannot be negative; pass 0 or more.")
        if self.effective_optimizer == "whitened" and self.effective_init_tokens == 0:
            raise LensLabError(
                f"{flag('optimizer')} whitened needs the closed-form start's statistics but {flag('init_tokens')} is "
                f"0; pass {flag('init_tokens')} above 0 or another {flag('optimizer')}."
            )
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.effective_steps:
            raise LensLabError(
                f"{flag('warmup_steps')} is {self.warmup_steps}, but it must lie in [0, {flag('steps')} "
                f"{self.effective_steps}); pass fewer."
            )
        if self.seed < 0:
            raise LensLabError(f"{flag('seed')} is {self.seed}, but seeds cannot be negative; pass 0 or more.")
        if self.checkpoint_every < 0:
            raise LensLabError(
                f"{flag('checkpoint_every')} is {self.checkpoint_every}; pass 0 (no checkpoints) or more."
            )

    @property
    def defaults(self) -> RecipeDefaults:
        """What the recipe uses for the settings left at None."""
        return RECIPE_DEFAULTS[self.recipe]

    def _or_recipe_default(self, name: str) -> Any:
        """The setting `name`, or the recipe's default for it (`RecipeDefaults`) when it is None."""
        value = getattr(self, name)
        return getattr(self.defaults, name) if value is None else value

    @property
    def effective_steps(self) -> int:
        """`steps`, or the recipe's default when it is None."""
        return self._or_recipe_default("steps")

    @property
    def effective_optimizer(self) -> str:
        """`optimizer`, or the recipe's default when it is None."""
        return self._or_recipe_default("optimizer")

    @property
    def effective_lr(self) -> float:
        """`lr`, or the optimiser's default when it is None."""
        return DEFAULT_LR[self.effective_optimizer] if self.lr is None else self.lr

    @property
    def effective_weight_decay(self) -> float:
        """`weight_decay`, or the recipe's default when it is None."""
        return self._or_recipe_default("weight_decay")

    @property
    def effective_init_tokens(self) -> int:
        """`init_tokens`, or the recipe's default when it is None."""
        return self._or_recipe_default("init_tokens")

    @property
    def effective_warmup_steps(self) -> int:
        """`warmup_steps`, or the recipe's default for the optimiser when it is None.

        tuned-lens 0.2.0 means to warm Adam up for min(1000, steps // 5) steps, but compares an enum to a string
        and so never does; lenslab does what it means, since Adam without warm-up trains these lenses poorly.
        """
        if self.warmup_steps is not None:
            return self.warmup_steps
        if self.effective_optimizer != "adam":  # SGD, whitened or not, never warms up (as in tuned-lens)
            return 0
        return min(1000, int(self.effective_steps * self.defaults.warmup_fraction))

    def fingerprint(self) -> dict[str, Any]:
        """The fields that decide the trained lens (with defaults resolved), for comparing two runs."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in NOT_IN_FINGERPRINT}
        resolved = {
            "steps": self.effective_steps, "optimizer": self.effective_optimizer, "lr": self.effective_lr,
            "weight_decay": self.effective_weight_decay, "warmup_steps": self.effective_warmup_steps,
            "init_tokens": self.effective_init_tokens,
        }  # fmt: skip
        return fields | resolved
