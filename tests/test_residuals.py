"""Residual capture against Hugging Face's own hidden states and hand-computed embeddings."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, tiny_model

from lenslab.adapter import ModelView
from lenslab.errors import LensLabError
from lenslab.residuals import capture_residuals


@functools.cache
def _view(family: str) -> ModelView:
    return ModelView.from_model(tiny_model(family))


def _ids(batch: int = 2, seq: int = 6, seed: int = 2) -> torch.Tensor:
    """Token ids that avoid the pad/bos/eos ids 0..2."""
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _hooks(view: ModelView) -> int:
    """Hooks on the layers (transformers installs its own output-capturing ones, which stay)."""
    return sum(len(layer._forward_hooks) + len(layer._forward_pre_hooks) for layer in view.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_residuals_match_hugging_face_hidden_states(family):
    """HF's hidden_states[p] is the input of layer p for p < L (its last one is usually normalised)."""
    view, ids = _view(family), _ids()
    with torch.no_grad():
        reference = view.model(ids, output_hidden_states=True)
        hooks = _hooks(view)
        residuals = capture_residuals(view, ids)
    assert _hooks(view) == hooks
    assert len(residuals.hidden) == view.num_layers + 1
    assert all(h.shape == (*ids.shape, view.d_model) for h in residuals.hidden)
    for captured, expected in zip(residuals.hidden[:-1], reference.hidden_states[:-1]):
        torch.testing.assert_close(captured, expected)
    torch.testing.assert_close(residuals.logits, reference.logits)


def test_position_zero_is_the_input_of_layer_zero():
    ids = _ids()
    with torch.no_grad():
        bloom = _view("bloom").model.transformer
        expected = bloom.word_embeddings_layernorm(bloom.word_embeddings(ids))
        torch.testing.assert_close(capture_residuals(_view("bloom"), ids).hidden[0], expected)

        gemma = _view("gemma")
        scaled = gemma.model.model.embed_tokens.weight[ids] * math.sqrt(gemma.d_model)
        torch.testing.assert_close(capture_residuals(gemma, ids).hidden[0], scaled)

        granite = _view("granite")
        multiplied = granite.model.model.embed_tokens(ids) * granite.model.config.embedding_multiplier
        torch.testing.assert_close(capture_residuals(granite, ids).hidden[0], multiplied)

        opt = _view("opt-350m")
        decoder = opt.model.model.decoder
        positions = decoder.embed_positions(torch.ones_like(ids), 0)
        projected = decoder.project_in(decoder.embed_tokens(ids)) + positions
        torch.testing.assert_close(capture_residuals(opt, ids).hidden[0], projected)


def test_positions_subset_and_negative_positions():
    view, ids = _view("llama"), _ids()
    with torch.no_grad():
        full = capture_residuals(view, ids)
        subset = capture_residuals(view, ids, positions=[1, -1])
    assert subset.hidden[0] is None and subset.hidden[2] is not None
    torch.testing.assert_close(subset.hidden[1], full.hidden[1])
    torch.testing.assert_close(subset.hidden[-1], full.hidden[-1])
    torch.testing.assert_close(subset.logits, full.logits)


@pytest.mark.parametrize("positions", [[0], [0, 1], [2], [1, 3]])
def test_early_stop_gives_identical_residuals_and_skips_later_layers(positions):
    view, ids = _view("gpt_neox"), _ids()  # 3 layers
    hooks, later_calls = _hooks(view), []
    handle = view.layers[-1].register_forward_hook(lambda *_: later_calls.append(1))
    try:
        with torch.no_grad():
            full = capture_residuals(view, ids)
            later_calls.clear()
            early = capture_residuals(view, ids, positions=positions, need_logits=False)
    finally:
        handle.remove()
    assert early.logits is None
    for p in range(view.num_positions):
        if p in positions:
            assert torch.equal(early.hidden[p], full.hidden[p])
        else:
            assert early.hidden[p] is None
    assert len(later_calls) == (1 if max(positions) == view.num_layers else 0)
    assert _hooks(view) == hooks


def test_hooks_are_removed_when_the_forward_fails():
    view = _view("llama")
    hooks = _hooks(view)
    with pytest.raises(IndexError):
        capture_residuals(view, torch.tensor([[VOCAB + 5]]))
    assert _hooks(view) == hooks


def test_capture_with_grad_keeps_the_graph():
    view, ids = _view("qwen2"), _ids()
    residuals = view.capture(ids, positions=[1])
    assert residuals.hidden[1].requires_grad
    with torch.no_grad():
        torch.testing.assert_close(view.capture(ids, positions=[1]).hidden[1], residuals.hidden[1].detach())


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_matches_the_unpadded_sequence(family):
    view, pad = _view(family), 2
    ids = _ids(batch=2, seq=6)
    padded = ids.clone()
    padded[1, :pad] = view.model.config.pad_token_id or 0
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    with torch.no_grad():
        batch = view.capture(padded, mask)
        alone = view.capture(ids[1:, pad:])
    for together, single in zip(batch.hidden, alone.hidden):
        torch.testing.assert_close(together[1:, pad:], single, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch.logits[1:, pad:], alone.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(view.decode(batch.hidden[-1]), batch.logits, atol=1e-4, rtol=0)


def test_positions_out_of_range():
    with pytest.raises(LensLabError, match=r"positions 0\.\.2; pass positions within that range"):
        capture_residuals(_view("llama"), _ids(), positions=[3])
