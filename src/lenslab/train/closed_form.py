"""A closed-form start for the tuned lens: each translator fitted by ridge least squares before any KL step.

The tuned lens maps the residual h_l at lens position l to h_l + A_l h_l + b_l and decodes it with the model's
head. Before any KL training, a good A_l, b_l is the linear map that best predicts the last residual h_L from
h_l (the "jump to conclusions" map of Din et al. 2023): the ridge solution of

    minimise over A, b   sum over tokens |h_L - h_l - (A h_l + b)|^2  +  lambda |A|_F^2

whose normal equations need only X^T X and X^T Y (X = [h_l, 1], Y = h_L - h_l), summed over micro-batches in
float64 and solved once per position by a Cholesky factorisation (the regularised X^T X is symmetric positive
definite; and torch 2.13's batched LU, behind `torch.linalg.solve` and `inv`, hangs in MKL with two CPU threads).
A few thousand tokens pin it down (d_model + 1 unknowns per output coordinate), and it starts the KL fine-tuning
far below where the zero (logit lens) start is. lambda is `ridge` times the mean diagonal of X^T X (the bias column
excluded and not penalised), so the same setting suits residual streams of any scale.

Shrinkage toward the identity. From too few tokens a fitted map can decode worse than no map at all, and the
objective is the KL, which the squared error above does not bound (the final norm ignores the residual's scale,
which dominates the squared error). So one in `HELDOUT_EVERY` of the start's sequences (at least one of two or
more) is held out: the translators are first fitted without them, then each position's map (A, b) is scaled by
the alpha of `SHRINKAGE_GRID` whose decoding has the lowest KL to the model's on the held-out tokens. alpha = 0,
the logit lens, is a candidate, so no position ends up worse than the logit lens there. Finally the translators are
fitted again on all the start's tokens and scaled by those alphas: measured on SmolLM2-135M from 1,024 tokens, the
fit on all four sequences decoded with 0.84 bits/byte of KL where the fit on three had 1.05, and alphas chosen for
the smaller fit are if anything too cautious for the larger one. (The squared error's own optimal alpha, closed
form, is no substitute: it is known only after the held-out pass that the KL check needs it in, and on SmolLM2 it
chose 0.1 at a position where the KL's best was 0.5.) The check decodes each held-out token `len(SHRINKAGE_GRID)`
times per position, about as much vocabulary-wide work as two or three training steps on those tokens.

Memory. The sums live in host (CPU) memory, 16 L (d_model + 1)^2 bytes per process (8.6 GB for a 7B model of 32
layers and width 4096, 86 GB at 70B: 80 layers of 8192; under torchrun each process on a node holds its own),
never all on the model's device. There each micro-batch's products are formed one layer at a time, in float64:
about 32 tokens d_model + 16 (d_model + 1)^2 bytes besides the captured residuals (3.2 GB at width 8192 and 8,192
tokens), then added on the host, which moves the whole sums over the bus once per micro-batch (several seconds at
70B). Solving runs one position at a time on its translator's device (a data-centre GPU factorises in float64 far
faster than the host), holding about 32 (d_model + 1)^2 bytes (2.1 GB at width 8192). Under torchrun the sums are
averaged one layer at a time through the model's device, since NCCL reduces CUDA tensors only.

The same regularised X^T X, divided by the token count, is the second moment that the fast recipe's optimiser
whitens gradients with (`lenslab.train.whitened_sgd`); `input_inverses` hands it over one position at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lenslab.adapter import ModelView
from lenslab.errors import LensLabError
from lenslab.lenses import TunedLens, row_chunks
from lenslab.train.distributed import Processes

log = logging.getLogger(__name__)

HELDOUT_EVERY = 8
"""One in this many of the closed-form start's sequences is held out to choose the shrinkage (at least one of two)."""

SHRINKAGE_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Candidate scales alpha of each fitted map (A, b) -> alpha (A, b); 0 is the logit lens, 1 the fit itself. On
SmolLM2-135M from 1,024 tokens the held-out KL chose 0.25 to 0.75 at the early positions and 1 from the middle on;
a finer grid would cost a decoding per held-out token and position for each point."""


class NormalEquations(NamedTuple):
    """Sums over tokens of the least-squares problem of every lens position 0..L-1, in host memory."""

    gram: Tensor
    """[L, k, k] float64 X^T X, where X = [h_l, 1] (k = d_model + 1) or h_l alone for a lens without bias."""
    cross: Tensor
    """[L, k, d_model] float64 X^T (h_L - h_l)."""
    count: Tensor
    """[] float64 number of tokens summed."""

    @classmethod
    def zeros(cls, num_layers: int, d_model: int, bias: bool) -> NormalEquations:
        k = d_model + int(bias)
        return cls(
            gram=torch.zeros(num_layers, k, k, dtype=torch.float64),
            cross=torch.zeros(num_layers, k, d_model, dtype=torch.float64),
            count=torch.zeros((), dtype=torch.float64),
        )

    def add(self, hidden: list[Tensor], bias: bool) -> None:
        """Add the tokens of one micro-batch, in place. hidden: L + 1 residuals, each [batch, seq, d_model] on any
        device, where each layer's products are formed before they move to the host."""
        last = hidden[-1].flatten(0, -2).double()  # [tokens, d_model]
        self.count.add_(len(last))
        for layer in range(len(hidden) - 1):
            x = hidden[layer].flatten(0, -2).to(last.device, torch.float64)
            target = last - x
            if bias:
                x = torch.cat([x, x.new_ones(len(x), 1)], dim=1)  # [tokens, d_model + 1]
            self.gram[layer].add_((x.T @ x).cpu())
            self.cross[layer].add_((x.T @ target).cpu())

    def average(self, processes: Processes, device: torch.device) -> None:
        """Replace the sums by their mean over processes (the solution is unchanged by the common 1/n)."""
        processes.average_on([*self.gram, *self.cross, self.count], device)


class Affine(NamedTuple):
    """One position's fitted map, h -> h @ weight.T + bias (as `nn.Linear`), in float64."""

    weight: Tensor
    """[d_model, d_model] A."""
    bias: Tensor | None
    """[d_model] b, or None for a lens without bias."""


def regularised_gram(equations: NormalEquations, layer: int, ridge: float, device: torch.device) -> Tensor:
    """X^T X + lambda I on the residual coordinates (not the bias column) of one position: [k, k] float64 on
    `device`."""
    gram = equations.gram[layer].to(device, copy=True)
    penalised = gram.diagonal()[: equations.cross.shape[-1]]  # a view: the bias column is left unpenalised
    penalised.add_(ridge * penalised.mean())
    return gram


def solve_ridge(equations: NormalEquations, layer: int, ridge: float, device: torch.device) -> Affine:
    """The ridge solution of one position, computed on `device`."""
    d_model = equations.cross.shape[-1]
    cross = equations.cross[layer].to(device)
    solution = torch.cholesky_solve(cross, _cholesky(equations, layer, ridge, device))  # [k, d_model]
    return Affine(weight=solution[:d_model].T, bias=solution[d_model] if len(solution) > d_model else None)


def input_inverses(equations: NormalEquations, ridge: float, devices: list[torch.device]) -> Iterator[Tensor]:
    """The inverse of each position's regularised second moment (X^T X + lambda I) / tokens, one position at a
    time: [k, k] float64, computed on that position's device in `devices`: [L]."""
    for layer, device in enumerate(devices):
        yield torch.cholesky_inverse(_cholesky(equations, layer, ridge, device)) * equations.count.item()


def _cholesky(equations: NormalEquations, layer: int, ridge: float, device: torch.device) -> Tensor:
    """Lower Cholesky factor of one position's regularised X^T X: [k, k]; raises when it is not positive definite."""
    factor, info = torch.linalg.cholesky_ex(regularised_gram(equations, layer, ridge, device))
    if info.item():
        raise LensLabError(
            "The closed-form start's least-squares problem is singular (too few distinct tokens for the residual "
            "width); pass a larger --init-tokens or --ridge, or --init-tokens 0 to start from the logit lens."
        )
    return factor


def heldout_sequences(num_sequences: int) -> int:
    """How many of the closed-form start's `num_sequences` sequences are held out to choose the shrinkage."""
    return 0 if num_sequences < 2 else max(1, num_sequences // HELDOUT_EVERY)


class ClosedFormStart(NamedTuple):
    """What `fit_closed_form` did."""

    equations: NormalEquations
    """The normal equations of all its tokens, held-out ones included (averaged over processes)."""
    shrinkage: list[float] | None
    """[L] the alpha of `SHRINKAGE_GRID` each position's map was scaled by; None when no sequence could be held
    out (the maps are then unshrunk)."""


@torch.no_grad()
def fit_closed_form(
    view: ModelView,
    lens: TunedLens,
    tokens: Tensor,
    micro_batch: int,
    ridge: float,
    processes: Processes,
    progress: Callable[[int], None] | None = None,
) -> ClosedFormStart:
    """Set every translator of `lens` to its ridge solution on `tokens`, shrunk toward the identity as the held-out
    KL says (see the module docstring).

    tokens: [n, seq_len], the same on every process; each process reads its share (`rank::world_size`) of the
    fitted and of the held-out sequences (`tokens_read` of them), and the normal equations are averaged over
    processes before solving, so every process gets the solution of all the tokens. `progress` is called with the
    number of tokens of each micro-batch once it is read.
    """
    fitted, heldout = _split(tokens)
    share = slice(processes.rank, None, processes.world_size)
    equations = NormalEquations.zeros(view.num_layers, view.d_model, lens.bias)
    for hidden in _residuals(view, fitted[share], micro_batch, progress):
        equations.add(hidden, lens.bias)
    equations.average(processes, view.device)
    shrinkage = None
    if len(heldout):
        _set_translators(lens, equations, ridge, [1.0] * view.num_layers)
        kl = torch.zeros(view.num_layers, len(SHRINKAGE_GRID), dtype=torch.float64, device=view.device)
        for hidden in _residuals(view, heldout[share], micro_batch, progress):
            kl += _shrunk_kl_sums(view, lens, hidden)
            equations.add(hidden, lens.bias)
        processes.average([kl])
        # Each process's held-out sums joined the mean of the fitted ones, so their mean over processes is the
        # mean of all the tokens' sums.
        equations.average(processes, view.device)
        shrinkage = [SHRINKAGE_GRID[index] for index in kl.argmin(-1).tolist()]
        log.info(
            "Shrinkage of each position's closed-form map toward the identity (1: the fit, 0: the logit lens), "
            "chosen by KL on %d held-out tokens: %s", heldout.numel(), shrinkage,
        )  # fmt: skip
    else:
        log.warning(
            "The closed-form start reads a single sequence, so none is left to check its fit against the logit "
            "lens; pass --init-tokens of at least two sequences (%d) to have each position's shrinkage chosen.",
            2 * tokens.shape[1],
        )  # fmt: skip
    _set_translators(lens, equations, ridge, shrinkage or [1.0] * view.num_layers)
    log.info(
        "Initialised the translators by ridge least squares on %d tokens (%d of them held out first)",
        tokens.numel(), heldout.numel(),
    )  # fmt: skip
    return ClosedFormStart(equations=equations, shrinkage=shrinkage)


def tokens_read(tokens: Tensor, processes: Processes) -> int:
    """How many of `tokens` ([n, seq_len]) this process reads in `fit_closed_form`."""
    share = slice(processes.rank, None, processes.world_size)
    return sum(part[share].numel() for part in _split(tokens))


def _split(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """The sequences fitted first, [n - k, seq_len], and the last k, held out to choose the shrinkage."""
    num_heldout = heldout_sequences(len(tokens))
    return tokens[: len(tokens) - num_heldout], tokens[len(tokens) - num_heldout :]


def _residuals(
    view: ModelView, tokens: Tensor, micro_batch: int, progress: Callable[[int], None] | None
) -> Iterator[list[Tensor]]:
    """The residuals of every lens position, `Residuals.hidden`, for each micro-batch of `tokens`: [n, seq_len]."""
    for batch in tokens.split(micro_batch) if len(tokens) else ():
        input_ids = batch.to(view.device)
        with view.fused_activations():
            hidden = view.capture(input_ids, torch.ones_like(input_ids), need_logits=False).hidden
        yield hidden
        if progress is not None:
            progress(batch.numel())


def _set_translators(lens: TunedLens, equations: NormalEquations, ridge: float, scales: list[float]) -> None:
    """Set each position's translator to its ridge solution times its scale in `scales`: [L]."""
    for layer, (translator, scale) in enumerate(zip(lens.translators, scales, strict=True)):
        solution = solve_ridge(equations, layer, ridge, translator.weight.device)
        translator.weight.copy_(scale * solution.weight)
        if solution.bias is not None:
            translator.bias.copy_(scale * solution.bias)


def _shrunk_kl_sums(view: ModelView, lens: TunedLens, hidden: list[Tensor]) -> Tensor:
    """Sums over tokens of KL(p_final || p) for each position and each alpha of `SHRINKAGE_GRID`, p decoded from
    h + alpha translator(h) (alpha 1 being `lens` itself): [L, len(SHRINKAGE_GRID)] float64.

    hidden: L + 1 residuals, each [batch, seq, d_model].
    """
    flat = [h.flatten(0, -2) for h in hidden]  # [tokens, d_model] each
    sums = torch.zeros(view.num_layers, len(SHRINKAGE_GRID), dtype=torch.float64, device=view.device)
    for rows in row_chunks(len(flat[0]), view.vocab_size):
        final_log_probs = view.decode(flat[-1][rows]).float().log_softmax(-1)  # [chunk, vocab]
        for layer, translator in enumerate(lens.translators):
            h = flat[layer][rows]
            h_lens = h.to(translator.weight.device, translator.weight.dtype)  # as `TunedLens.transform` has it
            shift = translator(h_lens)
            for index, alpha in enumerate(SHRINKAGE_GRID):
                log_probs = view.decode((h_lens + alpha * shift).to(h.dtype)).float().log_softmax(-1)
                sums[layer, index] += F.kl_div(log_probs, final_log_probs, log_target=True, reduction="sum")
    return sums
