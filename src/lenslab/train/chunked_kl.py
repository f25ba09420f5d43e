"""KL(p_final || p_lens) over the vocabulary, a chunk of tokens at a time, with its gradient computed alongside.

The plain objective (`lenslab.train.objective`) builds each lens position's [batch, seq, vocab] logits and lets
autograd keep several tensors of that size for the backward. Here the head's last, widest step (the unembedding,
then the head's logit transform) runs inside one `torch.autograd.Function` that walks the tokens in chunks: for
each chunk it computes the target distribution, every position's lens logits, their KL, and the gradient of the KL
with respect to the unembedding's *input* (the gradient of KL(p || softmax(q)) with respect to q is
softmax(q) - p, which is multiplied by the unembedding weight). Only [positions, chunk, vocab] logits are alive at
any time, and the backward is a multiplication by the stored [positions, tokens, d_unembed] gradient.

The head is the model's own, read through its `ModelView` piece by piece, never re-implemented:
`ModelView.head_input` (final norm, project_out) runs under autograd before this function, the unembedding's weight
and bias come from the view, and the logits are the view's `transform_logits` of the unembedding's output, so that
training decodes exactly as evaluation does (`ModelView.decode`), whatever transforms the adapter knows. Where that
transform is a multiplication (`ModelView.logit_multiplier`: no transform, or a logit scale) the factor is applied
in place and differentiated by hand; any other transform (a softcap) is applied to each chunk as it is, and
differentiated by autograd, chunk by chunk.

The target's logits are computed here from the last residual (the model's own head, in float32) rather than
taken from the model's output, so the model's [batch, seq, vocab] logits need not exist at all.

Everything is computed from the *gap* between a lens position's logits and the target's, (z_lens - z_final) @ W.T
(the bias cancels): the KL is log sum_v p_v e^gap_v - sum_v p_v gap_v, two terms that vanish together as the lens
approaches the target, so that even a KL of 1e-7 nats keeps its relative precision in float32.

On CPU the element-wise part (the KL and softmax(q) - p of every row) runs in a small compiled kernel
(`lenslab.train.native_kl`), one pass per row in cache instead of one pass over the whole chunk per PyTorch
operation; where it is unavailable, and for heads whose transform is not a multiplication (softcapped heads),
PyTorch operations compute the same. Every [.., vocab] tensor of a multiplying head lives in buffers allocated once
per call and reused by every chunk: a fresh allocation of a chunk's size costs page faults on CPU each time. (Other
transforms allocate their own results and autograd's, chunk by chunk.)

`low_precision` runs both vocabulary-wide matrix products in bfloat16 (which CPUs with AMX and all recent GPUs
multiply several times faster than float32) without rounding the logits themselves: only the gap is rounded, so
the error scales with the difference from the target (small exactly where the KL is small, at late positions),
and the target's logits stay float32. The gradient product (softmax(q) - p) @ W likewise rounds the difference,
never the two probabilities separately.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lenslab.adapter import ModelView
from lenslab.train.native_kl import native_kl

LOW_PRECISION_DTYPE = torch.bfloat16

CHUNK_ELEMENTS = {"cpu": 2**22, "cuda": 2**26}
"""(lens positions x tokens) x vocabulary logits per chunk, by device type (other devices use the CPU's). On CPU
2^22 float32 logits are 16 MiB, far below one layer's logits of a training micro-batch; in a side test on the
Austen model's 8,192-token vocabulary, chunks of 128 to 2,048 rows ran alike (within the machine's noise) and 64
rows about 1.8 x slower. A GPU gets larger chunks because each chunk launches about a dozen kernels, whose fixed
cost would dominate 16 MiB of work (not measured: no GPU was available)."""


def supports_chunked_kl(view: ModelView) -> bool:
    """Whether the model's unembedding is a plain linear map, the only kind `chunked_kl` knows how to split."""
    return isinstance(view.unembed, nn.Linear)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively (so faster than float32, not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # torch has no public query for these CPU features; the private ones are read defensively.
        checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
        return any(check is not None and check() for check in checks)
    return False


def chunked_kl(view: ModelView, z_lens: Tensor, z_final: Tensor, *, low_precision: bool = False) -> Tensor:
    """Per-position sums over tokens of KL(p_final || p_lens) in nats: [positions]; differentiable in `z_lens`.

    z_lens: [positions, tokens, d_unembed] the unembedding's input for each lens position (`ModelView.head_input`
    of the translated residuals); z_final: [tokens, d_unembed] the same for the last residual, whose decoding is
    p_final (treated as a constant). The rest of the head is `view`'s: its unembedding, then `transform_logits`.
    """
    # The adapter reads the weights even where a device map offloads the head (its module then holds a meta tensor),
    # and the inputs may come from a final norm on another device.
    weight, bias = view.unembedding_weight(), view.unembedding_bias()
    return _ChunkedKL.apply(
        z_lens.to(weight.device), z_final.detach().to(weight.device), weight, bias, view.transform_logits,
        view.logit_multiplier, low_precision,
    )  # fmt: skip


def chunk_tokens(positions: int, vocab: int, device: torch.device) -> int:
    """Tokens per chunk: `CHUNK_ELEMENTS` logits over all `positions`, at least one token."""
    elements = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cpu"])
    return max(1, elements // (positions * vocab))


def _kl_and_logit_grad(gap: Tensor, target_log_probs: Tensor, target: Tensor) -> Tensor:
    """KL(p || q) per (position, token) [P, c] and, in `gap`, its gradient softmax(q) - p w.r.t. the lens logits.

    gap: [P, c, vocab] float32 lens logits minus target logits (overwritten); target_log_probs, target: [c, vocab]
    log p and p. Since q = p e^gap / sum(p e^gap), KL = log sum_v p_v e^gap_v - sum_v p_v gap_v: both terms vanish
    as q approaches p, so the KL keeps its relative precision however large the logits are (log p - log q from two
    log-softmaxes would round to ~1e-6 nats). The PyTorch twin of `fused_kl.c`.
    """
    mean_gap = torch.einsum("pcv,cv->pc", gap, target)
    shifted = gap.add_(target_log_probs)  # log q + log sum(p e^gap)
    peak = shifted.amax(-1, keepdim=True)
    weights = shifted.sub_(peak).exp_()
    total = weights.sum(-1, keepdim=True)
    weights.div_(total).sub_(target)
    return (peak + total.log()).squeeze(-1) - mean_gap


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z_lens, z_final, weight, bias, transform, multiplier, low_precision):
        head = _Head(weight, bias, transform, multiplier, low_precision)
        sums, grad = head.kl_and_grad(z_lens, z_final)
        ctx.save_for_backward(grad)
        ctx.input_dtype = z_lens.dtype
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        (grad,) = ctx.saved_tensors
        grad_lens = (grad * grad_sums[:, None, None]).to(ctx.input_dtype)
        return grad_lens, None, None, None, None, None, None


class _Head:
    """The unembedding and the head's logit transform, and the chunk loop of `_ChunkedKL.forward`."""

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        transform: Callable[[Tensor], Tensor],
        multiplier: float | None,
        low_precision: bool,
    ):
        self.weight32 = weight.float()  # [vocab, d]
        self.bias32 = None if bias is None else bias.float()
        self.matmul_dtype = LOW_PRECISION_DTYPE if low_precision else torch.float32
        self.matmul_weight = weight.to(self.matmul_dtype)
        self.transform = transform
        """`ModelView.transform_logits`: the head's logits from the unembedding's output, [..., vocab]."""
        self.multiplier = multiplier
        """`ModelView.logit_multiplier`: c when `transform` multiplies by c, else None."""

    def kl_and_grad(self, z_lens: Tensor, z_final: Tensor) -> tuple[Tensor, Tensor]:
        """Per-position KL sums [P] and the gradient of each with respect to z_lens: [P, tokens, d] float32."""
        positions, tokens, width = z_lens.shape
        vocab = self.weight32.shape[0]
        device = z_lens.device
        chunk = max(1, min(tokens, chunk_tokens(positions, vocab, device)))  # at least 1, even for no tokens
        # The kernel assumes finite inputs (-ffast-math); a diverged lens takes the PyTorch path, which reports it.
        # (A sum is finite only if every term is; one that overflows merely takes the slower path.) It knows only
        # a logit multiplier, so other transforms take the PyTorch path too.
        kernel = None
        if device.type == "cpu" and self.multiplier is not None and bool((z_lens.sum() + z_final.sum()).isfinite()):
            kernel = native_kl()
        floats = {"dtype": torch.float32, "device": device}
        target_buffer = torch.empty(3, chunk, vocab, **floats)  # logits, log-probabilities, probabilities
        # The gap's matrix product writes `products`, where the gradient's factor softmax(q) - p replaces it for the
        # gradient's product; in float32 `products` is `logits`, the PyTorch path's working buffer.
        logits = torch.empty(positions * chunk, vocab, **floats)
        low = self.matmul_dtype != torch.float32
        products = torch.empty(logits.shape, dtype=self.matmul_dtype, device=device) if low else logits
        row_kl = torch.empty(positions * chunk, **floats)
        sums = torch.zeros(positions, **floats)
        grad = torch.empty(z_lens.shape, **floats)
        for start in range(0, tokens, chunk):
            final = z_final[start : start + chunk].float()  # [c, d]
            n = len(final)
            rows = positions * n
            target_logits, raw_target = self._target_logits(final, target_buffer[0, :n])
            log_p = torch.log_softmax(target_logits, -1, out=target_buffer[1, :n])
            p = torch.exp(log_p, out=target_buffer[2, :n])
            # The lens's unembedding outputs minus the target's (the bias cancels), upcast before any subtraction.
            difference = (z_lens[:, start : start + n].float() - final).to(self.matmul_dtype).flatten(0, 1)
            gap = torch.mm(difference, self.matmul_weight.T, out=products[:rows])  # [P * c, vocab]
            if kernel is not None:
                kernel(gap, log_p, p, gap, row_kl[:rows], self.multiplier)  # the gradient's factor replaces the gap
                kl = row_kl[:rows].view(positions, n)
            else:
                work = logits[:rows].view(positions, n, vocab)
                if low:
                    work.view_as(gap).copy_(gap)
                if raw_target is None:
                    kl = self._multiplied_kl(work, log_p, p)
                else:
                    kl = self._transformed_kl(work, raw_target, target_logits, log_p, p)
                if low:
                    gap.copy_(work.view_as(gap))
            sums += kl.sum(-1)
            grad[:, start : start + n] = (gap @ self.matmul_weight).view(positions, n, width)
        return sums, grad

    def _target_logits(self, final: Tensor, out: Tensor) -> tuple[Tensor, Tensor | None]:
        """The target's logits [c, vocab] from its head inputs `final` [c, d], written into `out` when the transform
        is a multiplication; and the unembedding's raw output, which the other transforms need besides (else None).
        """
        raw = torch.mm(final, self.weight32.T, out=out)
        if self.bias32 is not None:
            raw.add_(self.bias32)
        if self.multiplier is None:
            return self.transform(raw), raw
        return (raw.mul_(self.multiplier) if self.multiplier != 1 else raw), None

    def _multiplied_kl(self, work: Tensor, log_p: Tensor, p: Tensor) -> Tensor:
        """KL per (position, token) [P, c] with PyTorch operations, for a transform that multiplies by `multiplier`.

        work: [P, c, vocab] float32 unembedding outputs of the lens minus the target's, replaced by the gradient of
        the KL with respect to them; log_p, p: [c, vocab] the target's log-probabilities and probabilities.
        """
        gap = work.mul_(self.multiplier) if self.multiplier != 1 else work  # the logits' gap
        kl = _kl_and_logit_grad(gap, log_p, p)
        if self.multiplier != 1:  # d logits / d raw = multiplier
            gap.mul_(self.multiplier)
        return kl

    def _transformed_kl(
        self, work: Tensor, raw_target: Tensor, target_logits: Tensor, log_p: Tensor, p: Tensor
    ) -> Tensor:
        """KL per (position, token) [P, c] for any logit transform, differentiated through it by autograd.

        work: as in `_multiplied_kl`; raw_target, target_logits: [c, vocab] the unembedding's output for the target
        and its transform (`_target_logits`); log_p, p: as in `_multiplied_kl`.
        """
        with torch.enable_grad():  # a custom Function's forward runs without grad
            raw_lens = work.add_(raw_target).detach().requires_grad_()
            lens_logits = self.transform(raw_lens)
        gap = lens_logits.detach() - target_logits
        kl = _kl_and_logit_grad(gap, log_p, p)  # `gap` becomes the gradient with respect to the lens logits
        (grad_raw,) = torch.autograd.grad(lens_logits, raw_lens, gap)
        work.copy_(grad_raw)
        return kl
