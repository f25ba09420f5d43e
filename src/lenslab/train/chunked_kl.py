"""KL(p_final || p_lens) over the vocabulary, a chunk of tokens at a time, with its gradient computed alongside.

The plain objective (`lenslab.train.objective`) builds each lens position's [batch, seq, vocab] logits and lets
autograd keep several tensors of that size for the backward. Here the head's last, widest step (the unembedding,
with any logit scale and softcap) runs inside one `torch.autograd.Function` that walks the tokens in chunks: for
each chunk it computes the target distribution, every position's lens logits, their KL, and the gradient of the KL
with respect to the unembedding's *input* (the gradient of KL(p || softmax(q)) with respect to q is
softmax(q) - p, which is multiplied by the unembedding weight). Only [positions, chunk, vocab] logits are alive at
any time, and the backward is a multiplication by the stored [positions, tokens, d_unembed] gradient.

The target's logits are computed here from the last residual (the model's own head, in float32) rather than
taken from the model's output, so the model's [batch, seq, vocab] logits need not exist at all.

Everything is computed from the *gap* between a lens position's logits and the target's, (z_lens - z_final) @ W.T
(the bias cancels): the KL is log sum_v p_v e^gap_v - sum_v p_v gap_v, two terms that vanish together as the lens
approaches the target, so that even a KL of 1e-7 nats keeps its relative precision in float32.

`low_precision` runs both vocabulary-wide matrix products in bfloat16 (which CPUs with AMX and all recent GPUs
multiply several times faster than float32) without rounding the logits themselves: only the gap is rounded, so
the error scales with the difference from the target (small exactly where the KL is small, at late positions),
and the target's logits stay float32. The gradient product (softmax(q) - p) @ W likewise rounds the difference,
never the two probabilities separately.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lenslab.adapter import ModelView

LOW_PRECISION_DTYPE = torch.bfloat16

CHUNK_ROWS = 512
"""(lens positions x tokens) rows of logits per chunk: 512 x vocabulary 8192 float32 logits are 16 MiB, small
enough to stay in a CPU's cache hierarchy and far below one layer's logits of a training micro-batch."""


def head_input(view: ModelView, h: Tensor) -> Tensor:
    """What the unembedding reads: the final norm and `project_out` applied to `h`.

    h: [..., d_model] -> [..., d_unembed]. The first half of `ModelView.decode`; `chunked_kl` does the rest.
    """
    if view.final_norm is not None:
        h = view.final_norm(h)
    if view.project_out is not None:
        h = view.project_out(h)
    return h


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

    z_lens: [positions, tokens, d_unembed] the unembedding's input for each lens position (`head_input` of the
    translated residuals); z_final: [tokens, d_unembed] the same for the last residual, whose decoding is p_final
    (treated as a constant).
    """
    unembed = view.unembed
    return _ChunkedKL.apply(
        z_lens, z_final.detach(), unembed.weight, unembed.bias, view.logit_scale, view.logit_softcap, low_precision
    )


def _cap(raw: Tensor, scale: float, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """The head's logits from the unembedding's output, in place, as `ModelView.decode` makes them, and
    tanh(scale * raw / softcap) (for the softcap's derivative) or None when there is no softcap."""
    if softcap is None:
        return (raw.mul_(scale) if scale != 1 else raw), None
    tanh = raw.mul_(scale / softcap).tanh_()
    return tanh * softcap, tanh


def _kl_and_logit_grad(gap: Tensor, target_log_probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """KL(p || q) per (position, token) [P, c] and its gradient softmax(q) - p with respect to the lens logits.

    gap: [P, c, vocab] float32 lens logits minus target logits (overwritten: the gradient is returned in it);
    target_log_probs, target: [c, vocab] log p and p. Since q = p e^gap / sum(p e^gap),
    KL = log sum_v p_v e^gap_v - sum_v p_v gap_v: both terms vanish as q approaches p, so the KL keeps its relative
    precision however large the logits are (log p - log q from two log-softmaxes would round to ~1e-6 nats).
    """
    mean_gap = torch.einsum("pcv,cv->pc", gap, target)
    shifted = gap.add_(target_log_probs)  # log q + log sum(p e^gap)
    peak = shifted.amax(-1, keepdim=True)
    weights = shifted.sub_(peak).exp_()
    total = weights.sum(-1, keepdim=True)
    kl = (peak + total.log()).squeeze(-1) - mean_gap
    return kl, weights.div_(total).sub_(target)


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z_lens, z_final, weight, bias, logit_scale, softcap, low_precision):
        positions, tokens, _ = z_lens.shape
        scale = 1.0 if logit_scale is None else float(logit_scale)
        weight32 = weight.float()
        bias32 = None if bias is None else bias.float()
        matmul_dtype = LOW_PRECISION_DTYPE if low_precision else torch.float32
        matmul_weight = weight.to(matmul_dtype)  # [vocab, d]
        sums = torch.zeros(positions, dtype=torch.float32, device=z_lens.device)
        grad = torch.empty(z_lens.shape, dtype=torch.float32, device=z_lens.device)
        chunk = max(1, CHUNK_ROWS // positions)
        for start in range(0, tokens, chunk):
            rows = slice(start, start + chunk)
            final = z_final[rows].float()  # [c, d]
            raw_target = F.linear(final, weight32, bias32)  # [c, vocab]
            target_logits = _cap(raw_target.clone(), scale, softcap)[0]
            target_log_probs = target_logits.log_softmax(-1)
            target = target_log_probs.exp()
            # The lens's unembedding outputs minus the target's (the bias cancels), upcast before any addition.
            difference = (z_lens[:, rows].float() - final).to(matmul_dtype)
            gap = (difference @ matmul_weight.T).float()  # [P, c, vocab]
            if softcap is None:
                tanh = None
                gap.mul_(scale)
            else:
                logits, tanh = _cap(gap.add_(raw_target), scale, softcap)
                gap = logits.sub_(target_logits)
            kl, grad_logits = _kl_and_logit_grad(gap, target_log_probs, target)
            sums += kl.sum(-1)
            if tanh is not None:  # d/draw softcap * tanh(scale * raw / softcap) = scale * (1 - tanh^2)
                grad_logits.mul_(tanh.square_().neg_().add_(1))
            if scale != 1:
                grad_logits.mul_(scale)
            grad[:, rows] = grad_logits.to(matmul_dtype) @ matmul_weight
        ctx.save_for_backward(grad)
        ctx.input_dtype = z_lens.dtype
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        (grad,) = ctx.saved_tensors
        grad_lens = (grad * grad_sums[:, None, None]).to(ctx.input_dtype)
        return grad_lens, None, None, None, None, None, None

