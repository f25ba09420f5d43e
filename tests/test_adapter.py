"""ModelView finds every family's parts, and explains what it cannot find."""

from __future__ import annotations

import functools

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, tiny_model
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from lenslab.adapter import FUSABLE_ACTIVATIONS, ModelView
from lenslab.architectures import LogitScale, LogitSoftcap
from lenslab.errors import LensLabError


@functools.cache
def _view(family: str) -> ModelView:
    return ModelView.from_model(tiny_model(family))


def _ids(batch: int = 2, seq: int = 5, seed: int = 1) -> torch.Tensor:
    """Token ids that avoid the pad/bos/eos ids 0..2."""
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_families_cover_tied_and_untied_unembeddings_and_a_head_bias():
    tied = {f: tiny_model(f).config.tie_word_embeddings for f in ("gpt2", "llama")}
    assert tied == {"gpt2": True, "llama": False}
    assert {f for f in FAMILIES if FAMILIES[f]().tie_word_embeddings} not in (set(), set(FAMILIES))
    assert _view("gptj").unembed.bias is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_finds_parts_and_decode_reproduces_logits(family):
    view = _view(family)
    model = view.model
    config = model.config
    assert view.layers is view.model.get_submodule(view.layers_path)
    assert isinstance(view.layers, nn.ModuleList) and view.num_layers == config.num_hidden_layers
    assert view.num_positions == config.num_hidden_layers + 1
    assert view.unembed is model.get_output_embeddings() is model.get_submodule(view.unembed_path)
    assert (view.final_norm is None) == (family == "opt-350m")
    assert view.vocab_size == VOCAB and view.unembedding_weight().shape == (VOCAB, view.unembed.in_features)
    assert view.d_model == config.hidden_size and view.dtype == torch.float32 and view.device.type == "cpu"

    ids = _ids()
    with torch.no_grad():
        residuals = view.capture(ids)
        reference = model(ids).logits
        decoded = view.decode(residuals.hidden[-1])
    assert len(residuals.hidden) == view.num_positions
    assert all(h.shape == (2, 5, view.d_model) for h in residuals.hidden)
    torch.testing.assert_close(residuals.logits, reference)
    assert (decoded - reference).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_discovery_without_validation_agrees(family):
    view, unchecked = _view(family), ModelView.from_model(tiny_model(family), validate=False)
    paths = ("layers_path", "final_norm_path", "unembed_path", "project_out_path", "logit_transforms")
    assert [getattr(unchecked, p) for p in paths] == [getattr(view, p) for p in paths]


@pytest.mark.parametrize(
    ("family", "expected", "multiplier"),
    [("gemma2", LogitSoftcap(0.5), None), ("gemma3", LogitSoftcap(0.5), None), ("cohere", LogitScale(0.25), 0.25),
     ("granite", LogitScale(0.25), 0.25), ("hyperclovax", LogitScale(4.0), 4.0), ("falcon_h1", LogitScale(0.25), 0.25),
     ("llama", None, 1.0)],
)  # fmt: skip
def test_output_transforms_are_read_and_matter(family, expected, multiplier):
    view = _view(family)
    assert view.logit_transforms == (() if expected is None else (expected,))
    assert view.logit_multiplier == multiplier
    if expected is None:
        return
    with torch.no_grad():
        residuals = view.capture(_ids())
        transforms, view.logit_transforms = view.logit_transforms, ()
        try:
            without = view.decode(residuals.hidden[-1])
        finally:
            view.logit_transforms = transforms
    # Without the transform the logits differ, so the reproduction test above can fail.
    assert (without - residuals.logits).abs().max().item() > 1e-2


def test_post_ln_model_has_projections_and_no_final_norm():
    view = _view("opt-350m")
    assert view.final_norm_path == "none" and view.project_out_path == "model.decoder.project_out"
    assert view.d_model == 48 and view.unembed.in_features == 32


def test_bloom_embedding_norm_is_not_the_final_norm():
    view = _view("bloom")
    assert view.final_norm is view.model.transformer.ln_f
    assert view.final_norm is not view.model.transformer.word_embeddings_layernorm


def test_explicit_paths():
    model = tiny_model("llama")
    view = ModelView.from_model(model, layers="model.layers", final_norm="model.norm", unembed="lm_head")
    assert (view.layers, view.final_norm, view.unembed) == (model.model.layers, model.model.norm, model.lm_head)
    post_ln = ModelView.from_model(tiny_model("opt-350m"), final_norm="none")
    assert post_ln.final_norm is None


def test_explicit_path_that_does_not_exist():
    with pytest.raises(LensLabError, match=r"layers='model\.blocks' points to nothing.*layers="):
        ModelView.from_model(tiny_model("llama"), layers="model.blocks")
    with pytest.raises(LensLabError, match=r"layers='model\.norm' points to \w*RMSNorm.*ModuleList"):
        ModelView.from_model(tiny_model("llama"), layers="model.norm")


def test_wrong_explicit_final_norm_fails_validation():
    with pytest.raises(LensLabError, match=r"does not reproduce its logits.*final_norm="):
        ModelView.from_model(tiny_model("llama"), final_norm="model.layers.0.input_layernorm")
    with pytest.raises(LensLabError, match=r"final norm or the unembedding is likely wrong.*'none'"):
        ModelView.from_model(tiny_model("llama"), final_norm="none")


def test_repr_shows_paths_not_modules():
    text = repr(_view("gpt2"))
    assert "layers_path='transformer.h'" in text and "GPT2Block" not in text


# A causal LM outside the table: only structure and behaviour can read it.


class TrunkConfig(PretrainedConfig):
    model_type = "lenslab-test-trunk"

    def __init__(self, hidden_size: int = 16, num_hidden_layers: int = 3, sequential: bool = False, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = VOCAB, hidden_size, num_hidden_layers
        self.sequential = sequential
        super().__init__(**kwargs)


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, hidden_states):
        return hidden_states + self.mlp(self.norm(hidden_states))


class TrunkLM(PreTrainedModel):
    """Embedding -> an input norm (not named as an embedding norm) -> blocks -> output norm -> head.

    Its blocks get the residual by keyword and its forward takes no ``use_cache``, unlike the families.
    """

    config_class = TrunkConfig

    def __init__(self, config: TrunkConfig):
        super().__init__(config)
        d = config.hidden_size
        self.trunk = nn.Module()
        self.trunk.embed = nn.Embedding(config.vocab_size, d)
        self.trunk.input_norm = nn.LayerNorm(d)
        blocks = [Block(d) for _ in range(config.num_hidden_layers)]
        self.trunk.blocks = nn.Sequential(*blocks) if config.sequential else nn.ModuleList(blocks)
        self.trunk.out_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.vocab_size)

    def get_input_embeddings(self):
        return self.trunk.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None):
        h = self.trunk.input_norm(self.trunk.embed(input_ids))
        for block in self.trunk.blocks:
            h = block(hidden_states=h)
        return CausalLMOutput(logits=self.head(self.trunk.out_norm(h)))


def _trunk(sequential: bool = False) -> TrunkLM:
    torch.manual_seed(0)
    return TrunkLM(TrunkConfig(sequential=sequential)).eval()


def test_structural_fallback_chooses_the_norm_that_runs_after_the_layers():
    model = _trunk()
    # Identical norms: only the running order tells the output norm from the input norm.
    model.trunk.input_norm.load_state_dict(model.trunk.out_norm.state_dict())
    view = ModelView.from_model(model)
    assert (view.layers_path, view.final_norm_path, view.unembed_path) == ("trunk.blocks", "trunk.out_norm", "head")
    with torch.no_grad():
        residuals = view.capture(_ids())
        torch.testing.assert_close(view.decode(residuals.hidden[-1]), residuals.logits)


def test_structural_norm_choice_needs_a_forward():
    with pytest.raises(LensLabError, match=r"several possible final norms.*final_norm=.*validate=True"):
        ModelView.from_model(_trunk(), validate=False)
    view = ModelView.from_model(_trunk(), final_norm="trunk.out_norm", validate=False)
    assert view.final_norm_path == "trunk.out_norm"


def test_unreadable_model_names_missing_part_and_fix():
    model = _trunk(sequential=True)
    with pytest.raises(LensLabError, match=r"Could not find the decoder layers of TrunkLM.*layers=.*final_norm="):
        ModelView.from_model(model)
    view = ModelView.from_model(model, layers="trunk.blocks")
    assert view.num_layers == 3 and view.final_norm is model.trunk.out_norm


def test_layers_that_do_not_run_are_reported():
    model = _trunk()
    model.trunk.spare = nn.ModuleList(Block(16) for _ in range(3))
    with pytest.raises(LensLabError, match=r"position 0 of TrunkLM captured nothing.*layers='trunk\.spare'"):
        ModelView.from_model(model, layers="trunk.spare")


def test_missing_head_is_reported():
    model = _trunk()
    model.get_output_embeddings = lambda: None
    with pytest.raises(LensLabError, match=r"get_output_embeddings\(\) returned None.*unembed="):
        ModelView.from_model(model)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo", "gptj"])
def test_fused_activations_give_the_same_residuals_and_are_put_back(family):
    view = ModelView.from_model(tiny_model(family))
    originals = [module for module in view.model.modules() if isinstance(module, FUSABLE_ACTIVATIONS)]
    assert originals, f"tiny {family} should use one of transformers' Python GELUs"
    input_ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        expected = view.capture(input_ids).hidden
        with view.fused_activations():
            assert not any(isinstance(m, FUSABLE_ACTIVATIONS) for m in view.model.modules())
            fused = view.capture(input_ids).hidden
    for h_fused, h in zip(fused, expected, strict=True):
        torch.testing.assert_close(h_fused, h, rtol=1e-5, atol=1e-5)
    assert [m for m in view.model.modules() if isinstance(m, FUSABLE_ACTIVATIONS)] == originals

    with pytest.raises(RuntimeError, match="interrupted"), view.fused_activations():
        raise RuntimeError("interrupted")
    assert [m for m in view.model.modules() if isinstance(m, FUSABLE_ACTIVATIONS)] == originals
