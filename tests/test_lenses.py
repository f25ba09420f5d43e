"""Logit lens and tuned lens: shared interface, zero-initialised equivalence, position and width checks."""

import pytest
import torch
from tiny_models import tiny_model

from lenslab import LogitLens, TunedLens
from lenslab.adapter import ModelView
from lenslab.errors import LensLabError


def captured(model, seed=0, batch=2, seq=7):
    view = ModelView.from_model(model)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
    with torch.no_grad():
        residuals = view.capture(input_ids)
    return view, residuals


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt-350m", "gemma2"])
def test_untrained_tuned_lens_equals_logit_lens_at_every_position(family):
    view, residuals = captured(tiny_model(family))
    logit_lens, tuned_lens = LogitLens.from_model(view), TunedLens.from_model(view)
    assert len(logit_lens) == len(tuned_lens) == view.num_layers + 1
    with torch.no_grad():
        for position, h in enumerate(residuals.hidden):
            assert torch.equal(tuned_lens(h, position), logit_lens(h, position))


def test_logit_lens_at_last_position_is_the_model():
    view, residuals = captured(tiny_model("gpt2"))
    with torch.no_grad():
        logits = LogitLens.from_model(view)(residuals.hidden[-1], view.num_layers)
    torch.testing.assert_close(logits, residuals.logits, atol=1e-4, rtol=0)


def test_tuned_lens_applies_affine_translator_and_leaves_last_position_alone():
    view, residuals = captured(tiny_model("llama"))
    lens = TunedLens.from_model(view)
    torch.manual_seed(0)
    with torch.no_grad():
        for translator in lens.translators:
            translator.weight.normal_(std=0.1)
            translator.bias.normal_(std=0.1)
        h = residuals.hidden[1]
        expected = h + h @ lens.translators[1].weight.T + lens.translators[1].bias
        torch.testing.assert_close(lens.transform(h, 1), expected)
        assert torch.equal(lens.transform(residuals.hidden[-1], view.num_layers), residuals.hidden[-1])


def test_tuned_lens_parameters_exclude_the_frozen_model():
    view, _ = captured(tiny_model("gpt2"))
    lens = TunedLens.from_model(view, bias=False)
    names = set(lens.state_dict())
    assert names == {f"translators.{i}.weight" for i in range(view.num_layers)}


def test_position_out_of_range_is_one_clear_error():
    view, residuals = captured(tiny_model("gpt2"))
    lens = TunedLens.from_model(view)
    with pytest.raises(LensLabError, match=r"Lens position 3 is out of range: this lens has positions 0\.\.2"):
        lens(residuals.hidden[0], 3)
    with pytest.raises(LensLabError, match="out of range"):
        LogitLens.from_model(view)(residuals.hidden[0], -1)


def test_hidden_size_mismatch_is_one_clear_error():
    view, _ = captured(tiny_model("gpt2"))
    with pytest.raises(LensLabError, match="Hidden size mismatch: got a residual of width 5"):
        TunedLens.from_model(view)(torch.zeros(1, 2, 5), 0)
