"""Which training sequences each step reads: a pure function of (seed, step), never of process history.

A resumed run therefore reads exactly the batches the uninterrupted run would have, and every process of a
distributed run computes the same step batch and takes its own share (`rank::world_size`) of it. The sequences
are read in a seeded random order without replacement; if a run asks for more than the data holds, it goes
round again in a fresh order (an epoch), with a warning from the loop.
"""

from __future__ import annotations

import math

import numpy as np
import torch


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
