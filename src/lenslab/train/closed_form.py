"""A closed-form start for the tuned lens: each translator fitted by ridge least squares before any KL step.

The tuned lens maps the residual h_l at lens position l to h_l + A_l h_l + b_l and decodes it with the model's
head. Before any KL training, a good A_l, b_l is the linear map that best predicts the last residual h_L from
h_l (the "jump to conclusions" map of Din et al. 2023): the ridge solution of

    minimise over A, b   sum over tokens |h_L - h_l - (A h_l + b)|^2  +  lambda |A|_F^2

whose normal equations need only X^T X and X^T Y (X = [h_l, 1], Y = h_L - h_l), summed over micro-batches in
float64 and solved once per position by a Cholesky factorisation (the regularised X^T X is symmetric positive
definite; and torch 2.13's batched LU, behind `torch.linalg.solve` and `inv`, hangs in MKL with two CPU threads).
A few thousand tokens pin it down (d_model + 1 unknowns per output coordinate), and it starts the KL fine-tuning
far below where the zero (logit lens) start is.

lambda is `ridge` times the mean diagonal of X^T X (the bias column excluded and not penalised), so the same
setting suits residual streams of any scale. Memory: 2 L (d_model + 1)^2 float64 numbers.

The same regularised X^T X, divided by the token count, is the second moment that the fast recipe's optimiser
whitens gradients with (`lenslab.train.whitened_sgd`); `input_inverses` hands it over.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import Tensor

from lenslab.adapter import ModelView
from lenslab.errors import LensLabError
from lenslab.lenses import TunedLens
from lenslab.train.distributed import Processes

log = logging.getLogger(__name__)


class NormalEquations(NamedTuple):
    """Sums over tokens of the least-squares problem of every lens position 0..L-1."""

    gram: Tensor
    """[L, k, k] float64 X^T X, where X = [h_l, 1] (k = d_model + 1) or h_l alone for a lens without bias."""
    cross: Tensor
    """[L, k, d_model] float64 X^T (h_L - h_l)."""
    count: Tensor
    """[] float64 number of tokens summed."""

    @classmethod
    def zeros(cls, num_layers: int, d_model: int, bias: bool, device: torch.device) -> NormalEquations:
        k = d_model + int(bias)
        return cls(
            gram=torch.zeros(num_layers, k, k, dtype=torch.float64, device=device),
            cross=torch.zeros(num_layers, k, d_model, dtype=torch.float64, device=device),
            count=torch.zeros((), dtype=torch.float64, device=device),
        )

    def add(self, hidden: list[Tensor], bias: bool) -> None:
        """Add the tokens of one micro-batch, in place. hidden: L + 1 residuals, each [batch, seq, d_model]."""
        last = hidden[-1].flatten(0, -2).double()  # [tokens, d_model]
        self.count.add_(len(last))
        for layer in range(len(hidden) - 1):
            x = hidden[layer].flatten(0, -2).double()
            target = last - x
            if bias:
                x = torch.cat([x, x.new_ones(len(x), 1)], dim=1)  # [tokens, d_model + 1]
            self.gram[layer].addmm_(x.T, x)
            self.cross[layer].addmm_(x.T, target)


def regularised_gram(equations: NormalEquations, ridge: float) -> Tensor:
    """X^T X + lambda I on the residual coordinates (not the bias column): [L, k, k] float64."""
    gram = equations.gram.clone()
    d_model = equations.cross.shape[-1]
    penalised = gram[:, :d_model, :d_model]  # a view: the bias column is left unpenalised
    scale = penalised.diagonal(dim1=-2, dim2=-1).mean(-1)  # [L]
    penalised.diagonal(dim1=-2, dim2=-1).add_((ridge * scale)[:, None])
    return gram


def solve_ridge(equations: NormalEquations, ridge: float, bias: bool) -> tuple[Tensor, Tensor | None]:
    """The ridge solution of every position: weights [L, d_model, d_model] (as `nn.Linear.weight`, so that
    translator(h) = h @ weight.T + bias) and biases [L, d_model] (None without bias), float64."""
    d_model = equations.cross.shape[-1]
    solution = torch.cholesky_solve(equations.cross, _cholesky(equations, ridge))  # [L, k, d_model]
    weights = solution[:, :d_model].transpose(1, 2)
    return weights, (solution[:, d_model] if bias else None)


def input_inverses(equations: NormalEquations, ridge: float) -> Tensor:
    """The inverse of each position's regularised second moment (X^T X + lambda I) / tokens: [L, k, k] float64."""
    return torch.cholesky_inverse(_cholesky(equations, ridge)) * equations.count


def _cholesky(equations: NormalEquations, ridge: float) -> Tensor:
    """Lower Cholesky factors of the regularised X^T X: [L, k, k]; raises when it is not positive definite."""
    factors, info = torch.linalg.cholesky_ex(regularised_gram(equations, ridge))
    if info.any():
        raise LensLabError(
            "The closed-form start's least-squares problem is singular (too few distinct tokens for the residual "
            "width); pass a larger --init-tokens or --ridge, or --init-tokens 0 to start from the logit lens."
        )
    return factors


def fit_closed_form(
    view: ModelView, lens: TunedLens, tokens: Tensor, micro_batch: int, ridge: float, processes: Processes
) -> NormalEquations:
    """Set every translator of `lens` to its ridge solution on this process's `tokens`: [n, seq_len]; returns the
    normal equations it solved.

    Under torchrun the normal equations are averaged over processes before solving, so every process gets the
    solution of all processes' tokens.
    """
    equations = NormalEquations.zeros(view.num_layers, view.d_model, lens.bias, view.device)
    for batch in tokens.split(micro_batch):
        input_ids = batch.to(view.device)
        with torch.no_grad(), view.fused_activations():
            residuals = view.capture(input_ids, torch.ones_like(input_ids), need_logits=False)
        equations.add(residuals.hidden, lens.bias)
    processes.average(list(equations))  # the solution is unchanged by the common 1/n
    weights, biases = solve_ridge(equations, ridge, lens.bias)
    with torch.no_grad():
        for layer, translator in enumerate(lens.translators):
            translator.weight.copy_(weights[layer])
            if biases is not None:
                translator.bias.copy_(biases[layer])
    log.info("Initialised the translators by ridge least squares on %d tokens per process", tokens.numel())
    return equations
