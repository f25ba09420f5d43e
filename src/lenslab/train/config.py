"""`TrainConfig`: every setting of a tuned-lens training run, defaulting to the paper's recipe.

The defaults are those the tuned lens paper (Belrose et al. 2023) published with its code (tuned-lens 0.2.0,
`scripts/train_loop.py` and `scripts/ingredients.py`): 250 steps of 2^18 tokens, SGD with Nesterov momentum 0.9
at an effective learning rate of 1, weight decay 1e-3, gradient clipping at global norm 1, and a linear decay of
the learning rate to 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from lenslab.errors import LensLabError

DEFAULT_LR = {"sgd": 1.0, "adam": 1e-3}
"""Effective learning rate per optimiser when `lr` is None (tuned-lens's defaults)."""

MICRO_BATCH_TOKENS = 2**13
"""Tokens per micro-batch when `batch_size` is None: large enough to keep a GPU busy, small enough that one
layer's [batch, seq, vocab] float32 logits of a 128k-token vocabulary stay near 4 GiB."""

# Fields that change only speed or memory, never the lens: a run may resume with other values.
NOT_IN_FINGERPRINT = ("batch_size", "checkpoint_every")


def flag(field_name: str) -> str:
    """The `lenslab train` flag that sets a `TrainConfig` field, e.g. `tokens_per_step` -> `--tokens-per-step`."""
    return "--" + field_name.replace("_", "-")


@dataclass
class TrainConfig:
    """Settings of `train_lens`; each field is also a `lenslab train` flag (see `flag`)."""

    steps: int = 250
    """Optimiser steps; the learning rate decays linearly to 0 over them."""
    tokens_per_step: int = 2**18
    """Tokens per optimiser step, over all processes; rounded to whole sequences (a multiple of the process count)."""
    batch_size: int | None = None
    """Sequences per forward pass (micro-batch) in each process; gradient accumulation fills `tokens_per_step`.
    None: as many as hold `MICRO_BATCH_TOKENS` tokens (at least one). Lower it when memory runs out."""
    recipe: Literal["paper"] = "paper"
    """How parameters are updated (see `lenslab.train.recipes.RECIPES`); "paper" is tuned-lens's recipe."""
    optimizer: Literal["sgd", "adam"] = "sgd"
    """SGD with Nesterov momentum (the paper's), or Adam (AMSGrad, beta2 0.999) as tuned-lens offers it."""
    lr: float | None = None
    """Effective learning rate; None for 1.0 with SGD, 1e-3 with Adam. For SGD the optimiser receives
    lr * (1 - momentum), undoing the 1 / (1 - momentum) gain of PyTorch's momentum, so 1.0 is the right scale."""
    momentum: float = 0.9
    """SGD momentum, or Adam's beta1."""
    weight_decay: float = 1e-3
    """L2 penalty on the translators; since they are residual (h + A h + b) it pulls the lens toward the logit lens."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm before each step."""
    warmup_steps: int | None = None
    """Steps of linear learning-rate warm-up; None for 0 with SGD and min(1000, steps // 5) with Adam."""
    seed: int = 0
    """Seeds the order in which training sequences are read: the batch of step s is a function of (seed, s)."""
    checkpoint_every: int = 50
    """Steps between checkpoints in the output directory (0: none); a killed run resumes from the last one."""
    mixed_precision: bool = True
    """Run the lens in bfloat16 autocast on CUDA devices that support it (the target stays float32)."""

    def __post_init__(self) -> None:
        for name in ("steps", "tokens_per_step", "batch_size", "lr", "max_grad_norm"):
            value = getattr(self, name)  # None (batch_size, lr) means "choose for me"
            if value is not None and not value > 0:
                raise LensLabError(f"{flag(name)} is {value}, but it must be positive; pass a value above 0.")
        if self.optimizer not in DEFAULT_LR:
            raise LensLabError(
                f"Unknown optimizer {self.optimizer!r}; pass {flag('optimizer')} {' or '.join(DEFAULT_LR)}."
            )
        from lenslab.train.recipes import RECIPES  # imported late: torch is not needed to parse settings

        if self.recipe not in RECIPES:
            raise LensLabError(f"Unknown recipe {self.recipe!r}; pass {flag('recipe')} {' or '.join(RECIPES)}.")
        if not 0 <= self.momentum < 1:
            raise LensLabError(f"{flag('momentum')} is {self.momentum}, but it must lie in [0, 1); pass e.g. 0.9.")
        if self.weight_decay < 0:
            raise LensLabError(
                f"{flag('weight_decay')} is {self.weight_decay}, but it cannot be negative; pass 0 or more."
            )
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise LensLabError(
                f"{flag('warmup_steps')} is {self.warmup_steps}, but it must lie in [0, {flag('steps')} {self.steps}); "
                "pass fewer."
            )
        if self.seed < 0:
            raise LensLabError(f"{flag('seed')} is {self.seed}, but seeds cannot be negative; pass 0 or more.")
        if self.checkpoint_every < 0:
            raise LensLabError(
                f"{flag('checkpoint_every')} is {self.checkpoint_every}; pass 0 (no checkpoints) or more."
            )

    @property
    def effective_lr(self) -> float:
        """`lr`, or the optimiser's default when it is None."""
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    @property
    def effective_warmup_steps(self) -> int:
        """`warmup_steps`, or the optimiser's default when it is None.

        tuned-lens 0.2.0 means to warm Adam up for min(1000, steps // 5) steps, but compares an enum to a string
        and so never does; lenslab does what it means, since Adam without warm-up trains these lenses poorly.
        """
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(1000, self.steps // 5) if self.optimizer == "adam" else 0

    def micro_batch_size(self, seq_len: int) -> int:
        """`batch_size`, or the number of `seq_len`-token sequences that hold `MICRO_BATCH_TOKENS` tokens."""
        return self.batch_size or max(1, MICRO_BATCH_TOKENS // seq_len)

    def fingerprint(self) -> dict[str, Any]:
        """The fields that decide the trained lens (with defaults resolved), for comparing two runs."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in NOT_IN_FINGERPRINT}
        return fields | {"lr": self.effective_lr, "warmup_steps": self.effective_warmup_steps}
