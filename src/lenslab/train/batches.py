"""Which training sequences each step reads, and how many go through the model at once.

The sequences of a step are a pure function of (seed, step), never of process history: a resumed run therefore
reads exactly the batches the uninterrupted run would have, and every process of a distributed run computes the
same step batch and takes its own share (`rank::world_size`) of it. The sequences are read in a seeded random order
without replacement; if a run asks for more than the data holds, it goes round again in a fresh order (an epoch),
with a warning from the loop.

A step's sequences go through the model in micro-batches of `TrainConfig.batch_size` sequences or, when that is
None, of as many as `choose_micro_batch` estimates to fit in the device's free memory.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from lenslab.adapter import ModelView
from lenslab.train.chunked_kl import CHUNK_ELEMENTS

log = logging.getLogger(__name__)

MAX_MICRO_BATCH_TOKENS = {"cpu": 2**13, "cuda": 2**16}
"""Tokens per micro-batch at most when `TrainConfig.batch_size` is None, by device type (other devices use the
CPU's). On a CPU, whose arithmetic is already in large matrix products, larger micro-batches gain nothing; a GPU
gets more, since each micro-batch costs a few hundred kernel launches per layer whatever its size."""

MEMORY_FRACTION = 0.5
"""Share of the free memory a micro-batch may fill by `MicroBatchMemory`'s estimate, which counts the large tensors
only: the rest is for what it leaves out (the allocator's fragmentation, smaller temporaries) and for other
programs."""


class MicroBatchMemory(NamedTuple):
    """Estimated memory of one training micro-batch (`micro_batch_memory`), beyond the model and the lens."""

    per_token: int
    """Bytes per token of the micro-batch."""
    fixed: int
    """Bytes whatever the micro-batch's size (the chunked KL's buffers and copies of the unembedding)."""


def sequences_per_step(tokens_per_step: int, seq_len: int, world_size: int = 1) -> int:
    """Sequences in one step over all processes: `tokens_per_step / seq_len`, rounded up to a multiple of
    `world_size` so that every process reads the same number."""
    return world_size * math.ceil(tokens_per_step / (seq_len * world_size))


def step_indices(step: int, per_step: int, num_sequences: int, seed: int) -> torch.Tensor:
    """Indices into the training sequences for `step` (0-based): [per_step] int64.

    Position i of the whole run (i = step * per_step + j) reads element i % n of epoch i // n's permutation,
    which is drawn from (seed, epoch) alone.
    """
    positions = np.arange(step * per_step, (step + 1) * per_step)
    epochs = positions // num_sequences
    indices = np.empty(per_step, dtype=np.int64)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([seed, int(epoch)]).permutation(num_sequences)
        in_epoch = epochs == epoch
        indices[in_epoch] = order[positions[in_epoch] % num_sequences]
    return torch.from_numpy(indices)


def micro_batch_memory(view: ModelView, seq_len: int, chunked: bool) -> MicroBatchMemory:
    """What one training micro-batch of `seq_len`-token sequences holds at its peak, by the largest tensors: every
    lens position's residual, one block's forward temporaries, and the objective's (`chunked`: the fast recipe's
    chunked KL; else the plain objective's [tokens, vocab] logits). The closed-form start's micro-batches hold less.
    """
    size, width, layers, vocab = view.dtype.itemsize, view.d_model, view.num_layers, view.vocab_size
    config = view.model.config.get_text_config()
    hidden = getattr(config, "intermediate_size", None) or 4 * width  # GPT-2 leaves n_inner None for 4 d_model
    heads = getattr(config, "num_attention_heads", None) or 1
    residuals = (layers + 1) * width * size
    # The MLP's hidden activations (two of them when gated) and, with eager attention, each head's float32 row
    # of attention weights.
    forward = (2 * hidden + 4 * width) * size + heads * seq_len * 4
    if chunked:
        # Per position, float32 under autograd: the translated residual, the final norm's input and output, the
        # unembedding's stacked input, and the KL's stored gradient with its backward.
        objective = 6 * layers * width * 4
        chunk_elements = CHUNK_ELEMENTS.get(view.device.type, CHUNK_ELEMENTS["cpu"])
        # Three float32 chunk buffers of logits, and float32 and bfloat16 copies of the unembedding.
        fixed = 3 * chunk_elements * 4 + vocab * width * 6
    else:
        # The model's logits, then the target's float32 probabilities, one position's float32 logits, their
        # log-softmax and its gradient.
        objective = vocab * size + 4 * vocab * 4
        fixed = 0
    return MicroBatchMemory(per_token=residuals + forward + objective, fixed=fixed)


def free_memory(device: torch.device) -> int | None:
    """Bytes this process can still fill on `device`: free CUDA memory (with what PyTorch holds unused), or the
    available RAM shared by the node's processes on the CPU (Linux's MemAvailable); None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            lines = Path("/proc/meminfo").read_text().splitlines()
        except OSError:
            return None
        available = [int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")]
        return available[0] // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if available else None
    return None


def micro_batch_sequences(memory: MicroBatchMemory, seq_len: int, free_bytes: int | None, device_type: str) -> int:
    """Sequences per micro-batch: the largest power of two whose estimated `memory` fits in `MEMORY_FRACTION` of
    `free_bytes` (unknown: no limit) within `MAX_MICRO_BATCH_TOKENS`, and at least one.

    A power of two, so that micro-batches divide the usual power-of-two steps without a small remainder.
    """
    tokens = MAX_MICRO_BATCH_TOKENS.get(device_type, MAX_MICRO_BATCH_TOKENS["cpu"])
    if free_bytes is not None:
        tokens = min(tokens, int((MEMORY_FRACTION * free_bytes - memory.fixed) // memory.per_token))
    sequences = max(1, tokens // seq_len)
    return 1 << (sequences.bit_length() - 1)


def choose_micro_batch(view: ModelView, seq_len: int, chunked: bool) -> int:
    """`micro_batch_sequences` for this model on its device, logged (with a warning when even one sequence seems
    too many)."""
    memory = micro_batch_memory(view, seq_len, chunked)
    free_bytes = free_memory(view.device)
    sequences = micro_batch_sequences(memory, seq_len, free_bytes, view.device.type)
    needed = memory.fixed + sequences * seq_len * memory.per_token
    if free_bytes is None:
        log.info("Micro-batches of %d sequences (about %.2g GiB; free memory unknown)", sequences, needed / 2**30)
    elif needed > MEMORY_FRACTION * free_bytes:
        log.warning(
            "A micro-batch of one sequence needs about %.2g GiB but %.2g GiB are free on %s; pass a smaller "
            "--seq-len if memory runs out.", needed / 2**30, free_bytes / 2**30, view.device,
        )  # fmt: skip
    else:
        log.info(
            "Micro-batches of %d sequences: about %.2g GiB of the %.2g GiB free on %s",
            sequences, needed / 2**30, free_bytes / 2**30, view.device,
        )  # fmt: skip
    return sequences
