"""Recipes: how a run starts, which objective it back-propagates, and how gradients become parameter updates.

The training loop (`lenslab.train.loop`) owns everything a recipe does not: data order, the closed-form start
(`TrainConfig.init_tokens`), averaging gradients over processes, checkpoints and logs. A recipe owns the defaults
of the settings left at None, the choice of objective (the plain layer-by-layer backward of
`lenslab.train.objective`, or the chunked one), the optimiser, the learning-rate schedule and the update itself,
so another one plugs in by subclassing `Recipe` and adding itself to `RECIPES`, and its defaults to
`lenslab.train.config.RECIPE_DEFAULTS` (torch-free, where `TrainConfig` reads them) under the same name.

The learning rate is a function of the step alone (no scheduler object), so a resumed run needs only the step
and the optimiser's state to continue exactly.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn
from torch.optim import Optimizer

from lenslab.train.closed_form import NormalEquations, input_inverses
from lenslab.train.config import TrainConfig
from lenslab.train.whitened_sgd import DAMPING, WhitenedSGD


class Recipe(ABC):
    """One way to train the lens; chosen by `TrainConfig.recipe`."""

    name: ClassVar[str]
    """Its key in `RECIPES` and `RECIPE_DEFAULTS` (the value of `TrainConfig.recipe` that selects it)."""
    chunked_kl: ClassVar[bool] = False
    """Back-propagate the KL through `lenslab.train.chunked_kl` (all positions at once, in chunks of tokens) rather
    than one position's full logits at a time."""

    def __init__(self, config: TrainConfig):
        # A config naming another recipe is read with this recipe's defaults, so `self.config.effective_*` and
        # what this recipe does always agree.
        self.config = config if config.recipe == self.name else dataclasses.replace(config, recipe=self.name)

    @abstractmethod
    def build_optimizer(self, params: list[nn.Parameter]) -> Optimizer:
        """The optimiser over the lens's trainable parameters, built once per run (its state is checkpointed)."""

    def start(self, optimizer: Optimizer, equations: NormalEquations) -> None:
        """Called once after the closed-form start of a fresh run, with the normal equations it solved; most recipes
        need nothing from them."""
        return None

    @abstractmethod
    def learning_rate(self, step: int) -> float:
        """The learning rate handed to the optimiser at `step` (0-based)."""

    @abstractmethod
    def update(self, optimizer: Optimizer, params: list[nn.Parameter], step: int, grad_norm: torch.Tensor) -> float:
        """Apply one step from the accumulated `.grad`s, whose global norm is `grad_norm`; returns the effective
        learning rate (`TrainConfig.lr` on the schedule), which the log records.

        The loop has already checked that `grad_norm` is finite, and zeroes the gradients afterwards.
        """


def linear_schedule(step: int, steps: int, warmup_steps: int) -> float:
    """Multiplier on the learning rate: linear warm-up over `warmup_steps`, then linear decay to 0 at `steps`.

    Without warm-up this is tuned-lens's `(steps - step) / steps` exactly. (With warm-up, tuned-lens 0.2.0 passes
    `steps - warmup` as the schedule's length and so reaches 0 `warmup` steps early; lenslab decays over the rest.)
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (steps - step) / (steps - warmup_steps))


class PaperRecipe(Recipe):
    """tuned-lens 0.2.0's recipe: SGD with Nesterov momentum (or AMSGrad Adam), clipping, linear decay.

    (Any of the optimisers can be chosen: the whitened one makes this the paper's schedule after a closed-form
    start.)
    """

    name = "paper"
    amsgrad: ClassVar[bool] = True
    """AMSGrad keeps Adam's effective step size from growing again late in training (tuned-lens's choice)."""

    def build_optimizer(self, params: list[nn.Parameter]) -> Optimizer:
        config = self.config
        # Weight decay is the coupled L2 kind, on weights and biases alike, as in tuned-lens.
        if config.effective_optimizer == "whitened":
            return WhitenedSGD(
                params, lr=self.learning_rate(0), momentum=config.momentum, weight_decay=config.effective_weight_decay
            )
        if config.effective_optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=self.learning_rate(0), momentum=config.momentum, nesterov=True,
                weight_decay=config.effective_weight_decay,
            )  # fmt: skip
        return torch.optim.Adam(
            params, lr=self.learning_rate(0), betas=(config.momentum, 0.999),
            weight_decay=config.effective_weight_decay, amsgrad=self.amsgrad,
        )  # fmt: skip

    def learning_rate(self, step: int) -> float:
        config = self.config
        lr = self.effective_learning_rate(step)
        if config.effective_optimizer in ("sgd", "whitened"):
            # PyTorch's momentum sums past gradients undamped, which multiplies the step by 1 / (1 - momentum);
            # tuned-lens divides it out, so that the effective rate is `lr` and 1.0 works.
            lr *= 1 - config.momentum
        return lr

    def effective_learning_rate(self, step: int) -> float:
        """`TrainConfig.lr` on the schedule at `step`: the rate `--lr` names, which the log records."""
        config = self.config
        return config.effective_lr * linear_schedule(step, config.effective_steps, config.effective_warmup_steps)

    def start(self, optimizer: Optimizer, equations: NormalEquations) -> None:
        if isinstance(optimizer, WhitenedSGD):
            devices = [weight.device for weight, _ in optimizer.translators]  # where each inverse is needed
            optimizer.set_preconditioners(input_inverses(equations, DAMPING, devices))

    def update(self, optimizer: Optimizer, params: list[nn.Parameter], step: int, grad_norm: torch.Tensor) -> float:
        torch.nn.utils.clip_grads_with_norm_(params, self.config.max_grad_norm, grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = self.learning_rate(step)
        optimizer.step()
        return self.effective_learning_rate(step)


class FastRecipe(PaperRecipe):
    """A closed-form start, then whitened SGD with linear decay on the chunked (bfloat16 where fast) KL.

    Measured against the paper's recipe in `docs/benchmarks.md`: the closed-form start alone, from a few thousand
    tokens, lands far below where the paper's recipe gets with its whole budget; whitened SGD then lowers the KL at
    every position, fastest at the early ones, where the start is furthest from the optimum. (Adam gains less
    there and, taking steps of the same size in every coordinate, disturbs the nearly exact late positions.)
    """

    name = "fast"
    amsgrad = False
    chunked_kl = True


RECIPES: dict[str, type[Recipe]] = {recipe.name: recipe for recipe in (FastRecipe, PaperRecipe)}
"""`TrainConfig.recipe` -> the class that implements it."""
