"""Recipes: how accumulated gradients become parameter updates.

The training loop (`lenslab.train.loop`) owns everything a recipe does not: data order, the loss and its
layer-by-layer backward, averaging gradients over processes, checkpoints and logs. A recipe owns the optimiser,
the learning-rate schedule and the update itself, so another one (Adam with warm-up, Muon, a closed-form
initialisation) plugs in by subclassing `Recipe` and adding itself to `RECIPES`.

The learning rate is a function of the step alone (no scheduler object), so a resumed run needs only the step
and the optimiser's state to continue exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.optim import Optimizer

if TYPE_CHECKING:
    from lenslab.train.config import TrainConfig


class Recipe(ABC):
    """One way to update the lens from the gradients of a step; chosen by `TrainConfig.recipe`."""

    def __init__(self, config: TrainConfig):
        self.config = config

    @abstractmethod
    def build_optimizer(self, params: list[nn.Parameter]) -> Optimizer:
        """The optimiser over the lens's trainable parameters, built once per run (its state is checkpointed)."""

    @abstractmethod
    def learning_rate(self, step: int) -> float:
        """The learning rate handed to the optimiser at `step` (0-based)."""

    @abstractmethod
    def update(self, optimizer: Optimizer, params: list[nn.Parameter], step: int, grad_norm: torch.Tensor) -> float:
        """Apply one step from the accumulated `.grad`s, whose global norm is `grad_norm`; returns the learning rate.

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
    """tuned-lens 0.2.0's recipe: SGD with Nesterov momentum (or AMSGrad Adam), clipping, linear decay."""

    def build_optimizer(self, params: list[nn.Parameter]) -> Optimizer:
        config = self.config
        if config.optimizer == "sgd":
            # Weight decay is the coupled L2 kind, on weights and biases alike, as in tuned-lens.
            return torch.optim.SGD(
                params, lr=self.learning_rate(0), momentum=config.momentum, nesterov=True,
                weight_decay=config.weight_decay,
            )  # fmt: skip
        # AMSGrad keeps the effective step size from growing again late in training (tuned-lens's choice).
        return torch.optim.Adam(
            params, lr=self.learning_rate(0), betas=(config.momentum, 0.999), weight_decay=config.weight_decay,
            amsgrad=True,
        )  # fmt: skip

    def learning_rate(self, step: int) -> float:
        config = self.config
        base = config.effective_lr
        if config.optimizer == "sgd":
            # PyTorch's momentum sums past gradients undamped, which multiplies the step by 1 / (1 - momentum);
            # tuned-lens divides it out, so that the effective rate is `lr` and 1.0 works.
            base *= 1 - config.momentum
        return base * linear_schedule(step, config.steps, config.effective_warmup_steps)

    def update(self, optimizer: Optimizer, params: list[nn.Parameter], step: int, grad_norm: torch.Tensor) -> float:
        torch.nn.utils.clip_grads_with_norm_(params, self.config.max_grad_norm, grad_norm)
        lr = self.learning_rate(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        return lr


RECIPES: dict[str, type[Recipe]] = {"paper": PaperRecipe}
"""`TrainConfig.recipe` -> the class that implements it."""
