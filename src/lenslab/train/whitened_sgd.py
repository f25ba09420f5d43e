"""SGD on whitened gradients: each translator's gradient multiplied by the inverse second moment of its input.

A translator's gradient is G = sum over tokens of delta x^T, where x = [h_l, 1] is its input and delta the gradient
at its output. Residual streams are badly conditioned (a few coordinates carry most of the norm), so plain SGD
crawls along the small directions; G C^-1, with C = E[x x^T] + ridge, is the step a Gauss-Newton method would take
if the output side were isotropic (the input factor of K-FAC, Martens & Grosse 2015), and it makes the step
independent of how the residual stream is scaled or rotated. C is exactly the matrix the closed-form start has
already summed (`lenslab.train.closed_form.NormalEquations`), so it costs nothing more to gather; its inverse is
kept in the optimiser's state, so a resumed run continues with the same one. Those inverses take as much memory on
the lens's device as the lens itself: L (d_model + 1)^2 float32 numbers (2.1 GB for a 7B model, 21 GB at 70B).

The momentum, Nesterov and (coupled) weight decay are `torch.optim.SGD`'s, applied to the whitened gradient.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

INVERSE_KEY = "input_inverse"
"""Where each translator weight's [k, k] preconditioner lives in the optimiser's state."""

DAMPING = 1e-2
"""Ridge added to the second moment before it is inverted, relative to its mean diagonal. It bounds how much a
step is amplified along directions the residuals hardly use, where the gradient is mostly float32 rounding noise
(which differs with the order of summation: between micro-batch sizes, or one process and several): with the
closed-form start's 1e-4 two data-parallel processes drifted 1e-3 apart in three steps. The trained lens hardly
depends on it: mean held-out KL 0.0283, 0.0284 and 0.0286 nats with 1e-4, 1e-3 and 1e-2 on the Austen model after
24 steps (a side experiment on cached residuals, not one of `benchmarks/`)."""


class WhitenedSGD(torch.optim.SGD):
    """`torch.optim.SGD` (Nesterov) whose step first whitens each translator's gradient; see the module docstring.

    params: the lens's parameters in `TunedLens.parameters()` order, so each translator's 2-D weight
    [d_model, d_model] is followed by its bias [d_model] when it has one. `set_preconditioners` must be called
    (or the state loaded from a checkpoint) before the first step.
    """

    def __init__(self, params: list[nn.Parameter], *, lr: float, momentum: float, weight_decay: float):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
        self.translators: list[tuple[nn.Parameter, nn.Parameter | None]] = []
        """(weight, bias or None) of each translator."""
        for param in params:
            if param.ndim == 2:
                self.translators.append((param, None))
            elif self.translators and self.translators[-1][1] is None and len(param) == len(self.translators[-1][0]):
                self.translators[-1] = (self.translators[-1][0], param)
            else:
                raise ValueError("WhitenedSGD expects each 2-D weight to be followed by at most one matching bias.")

    def set_preconditioners(self, inverses: Iterable[Tensor]) -> None:
        """Store each translator's preconditioner, in its weight's dtype and on its device: inverses, one [k, k] per
        translator (k = d_model + 1 with a bias), e.g. `lenslab.train.closed_form.input_inverses`, which computes
        them one at a time."""
        for (weight, _), inverse in zip(self.translators, inverses, strict=True):
            self.state[weight][INVERSE_KEY] = inverse.to(weight.device, weight.dtype)

    @torch.no_grad()
    def step(self, closure=None):
        for weight, bias in self.translators:
            if weight.grad is None:
                continue
            inverse = self.state[weight].get(INVERSE_KEY)
            if inverse is None:
                raise RuntimeError("WhitenedSGD.step before set_preconditioners: it has no input statistics.")
            grad = weight.grad if bias is None else torch.cat([weight.grad, bias.grad[:, None]], dim=1)
            whitened = grad @ inverse  # [d_model, k]
            weight.grad.copy_(whitened[:, : weight.shape[1]])
            if bias is not None:
                bias.grad.copy_(whitened[:, -1])
        return super().step(closure)
