"""The sample causal analyses work on: token ids and their clean residuals at the lens positions studied.

Every analysis of a layer (extraction, fidelity, alignment) reads the same tokens, so the mean a direction is
ablated to and the sequences paired for resampling are the same in the lens and in the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lenslab.adapter import ModelView


@torch.no_grad()
def capture_sample(
    view: ModelView,
    input_ids: Tensor,
    positions: list[int],
    *,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> dict[int, Tensor]:
    """Clean residuals of ``input_ids: [n_seq, seq]`` at each lens position: position -> [n_seq, seq, d_model].

    Each forward stops after the last position needed. ``progress(n)`` is called with the sequences done.
    """
    pieces: dict[int, list[Tensor]] = {position: [] for position in positions}
    for start in range(0, len(input_ids), batch_size):
        ids = input_ids[start : start + batch_size].to(view.device)
        hidden = view.capture(ids, positions=positions, need_logits=False).hidden
        for position in positions:
            pieces[position].append(hidden[position].detach())
        if progress is not None:
            progress(len(ids))
    return {position: torch.cat(parts) for position, parts in pieces.items()}
