"""Prediction trajectories as JSON (`lenslab show --output FILE.json`): one lens's trajectory as an object, several
as ``{"lenses": {name: object, ...}}``, in nats, with null where a statistic is undefined.

>>> trajectories_to_dict([logit, tuned])["lenses"]["tuned"]["kind"]  # doctest: +SKIP
'tuned'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from lenslab.trajectory import Trajectory

JSON_FORMAT = "lenslab-trajectory"
JSON_FORMAT_VERSION = 1


def trajectory_to_dict(trajectory: Trajectory) -> dict[str, Any]:
    """A JSON-ready dict; rows in lens-position order (last = the model's output), nats, null = undefined."""
    texts = trajectory.token_text
    document: dict[str, Any] = {
        "format": JSON_FORMAT,
        "format_version": JSON_FORMAT_VERSION,
        "model": trajectory.model_name,
        "lens": trajectory.lens_name,
        "kind": trajectory.lens_kind,
        "start": trajectory.start,
        "tokens": trajectory.tokens,
        "token_ids": trajectory.input_ids.tolist(),
        "next_tokens": trajectory.next_tokens,
        "layers": trajectory.layers,
        "top_k": [
            [
                [{"token": texts[i], "id": i, "prob": p} for i, p in zip(ids, probs)]
                for ids, probs in zip(layer_ids, layer_probs)
            ]
            for layer_ids, layer_probs in zip(trajectory.top_k_ids.tolist(), trajectory.top_k_probs.tolist())
        ],
        "entropy": _json_rows(trajectory.entropy),
        "kl_to_final": _json_rows(trajectory.kl_to_final),
        "next_token_rank": _json_rows(trajectory.next_token_rank),
        "next_token_prob": _json_rows(trajectory.next_token_prob),
    }
    if trajectory.target_logprob is not None:
        document["targets"] = [texts[i] for i in trajectory.target_ids]
        document["anti_targets"] = [texts[i] for i in trajectory.anti_target_ids]
        document["target_logprob"] = _json_rows(trajectory.target_logprob)
        document["target_rank"] = _json_rows(trajectory.target_rank)
        document["target_score"] = _json_rows(trajectory.target_score)
    if trajectory.anti_target_logprob is not None:
        document["anti_target_logprob"] = _json_rows(trajectory.anti_target_logprob)
    return document


def trajectories_to_dict(trajectories: Sequence[Trajectory]) -> dict[str, Any]:
    """One trajectory's `trajectory_to_dict`; several as ``{"lenses": {lens_name: ..., ...}}``, in order."""
    if len(trajectories) == 1:
        return trajectory_to_dict(trajectories[0])
    lenses = {trajectory.lens_name: trajectory_to_dict(trajectory) for trajectory in trajectories}
    return {"format": JSON_FORMAT, "format_version": JSON_FORMAT_VERSION, "lenses": lenses}


def _json_rows(values: Tensor) -> list[list[float | int | None]]:
    """[P, N] -> nested lists, with NaN and negative ranks (undefined) as null."""
    rows = values.tolist()
    if values.dtype.is_floating_point:
        return [[None if math.isnan(v) else v for v in row] for row in rows]
    return [[None if v < 0 else v for v in row] for row in rows]
