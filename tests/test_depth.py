"""Prediction depth (`lenslab.applications.depth`) and `lenslab depth`, against plain loops over layers and
checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from support.tiny_lm import pack, read_documents
from transformers import AutoModelForCausalLM

from lenslab.adapter import ModelView
from lenslab.applications.depth import (
    add_learning_order,
    learned_checkpoint,
    prediction_depth,
    settled_from,
    spearman,
)
from lenslab.cli import main
from lenslab.errors import LensLabError
from lenslab.lenses import LogitLens, TunedLens

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def view(tiny_lm) -> ModelView:
    return ModelView.from_model(tiny_lm.model)


@pytest.fixture(scope="module")
def tokens(tiny_lm) -> torch.Tensor:
    """[6, 32] held-out token chunks."""
    return pack(tiny_lm.tokenizer, read_documents(tiny_lm.heldout_text_path)[:20], 32)[:6]


@pytest.fixture(scope="module")
def random_lens(view) -> TunedLens:
    """Translators that scramble the early layers, so depths spread over every layer."""
    lens = TunedLens.from_model(view)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for translator in lens.translators:
            translator.weight.copy_(0.3 * torch.randn(translator.weight.shape, generator=generator))
    return lens


@pytest.fixture(scope="module")
def random_init_dir(tiny_lm, tmp_path_factory):
    """An untrained checkpoint of the tiny LM's architecture: the "step 0" of its training."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_lm.model.config)
    directory = tmp_path_factory.mktemp("step0")
    model.save_pretrained(directory)
    tiny_lm.tokenizer.save_pretrained(directory)
    return directory


def brute_force_depth(model, lens, tokens):
    """Depth and loss of every token by the definition, one token and one layer at a time.

    Residuals come from Hugging Face's ``output_hidden_states`` (not lenslab's capture); GPT-2 normalises its
    last hidden state, so the last position's prediction is taken from the model's logits.
    """
    depths = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.long)
    losses = torch.zeros(depths.shape)
    num_layers = model.config.n_layer
    with torch.no_grad():
        for chunk, ids in enumerate(tokens):
            output = model(input_ids=ids[None], output_hidden_states=True)
            for t in range(tokens.shape[1] - 1):
                top1 = [lens(output.hidden_states[p][0, t], p).argmax().item() for p in range(num_layers)]
                top1.append(output.logits[0, t].argmax().item())
                depth = next(d for d in range(num_layers + 1) if all(p == top1[-1] for p in top1[d:]))
                depths[chunk, t] = depth
                losses[chunk, t] = F.cross_entropy(output.logits[0, t], ids[t + 1])
    return depths, losses


def test_settled_from_matches_definition():
    flags = torch.rand(5, 40, generator=torch.Generator().manual_seed(0)) < 0.7
    expected = [next((k for k in range(5) if flags[k:, j].all()), 5) for j in range(40)]
    assert settled_from(flags).tolist() == expected


def test_prediction_depth_matches_brute_force(tiny_lm, view, tokens, random_lens):
    result = prediction_depth(view, random_lens, tokens, batch_size=4)
    depths, losses = brute_force_depth(tiny_lm.model, random_lens, tokens)
    assert torch.equal(result.depths, depths)
    torch.testing.assert_close(result.losses, losses, rtol=1e-4, atol=1e-5)
    assert len(set(depths.flatten().tolist())) >= 3  # the check covers several depths, not only 0 or L
    assert result.spearman_depth_loss == pytest.approx(spearmanr(depths.flatten(), losses.flatten()).statistic)
    report = result.to_json()
    assert report["depths"] == depths.flatten().tolist()
    assert report["histogram"] == torch.bincount(depths.flatten(), minlength=5).tolist()
    assert json.loads(json.dumps(report))["spearman_depth_loss"] == pytest.approx(result.spearman_depth_loss)


def test_logit_lens_depths_run_from_0_to_L(view, tokens):
    result = prediction_depth(view, LogitLens(view), tokens)
    assert result.depths.shape == (6, 31)
    assert 0 <= result.depths.min() and result.depths.max() <= view.num_layers
    # Harder tokens settle later: depth and loss correlate positively on a trained model.
    assert result.spearman_depth_loss > 0


def interpolated(start, end, weight: float):
    """A model whose parameters are (1 - weight) * start + weight * end: a stand-in for a mid-training checkpoint."""
    model = AutoModelForCausalLM.from_config(end.config).eval()
    ends = dict(end.named_parameters())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(torch.lerp(dict(start.named_parameters())[name], ends[name], weight))
    return model


def test_learned_checkpoint_matches_brute_force(tiny_lm, random_init_dir, tokens, random_lens, view):
    step0 = AutoModelForCausalLM.from_pretrained(random_init_dir).eval()
    middle = interpolated(step0, tiny_lm.model, 0.6)
    # The return to step 0 makes "stays right" matter: learning at k needs k and every later checkpoint right.
    checkpoints = [step0, middle, tiny_lm.model, step0, middle, tiny_lm.model]
    learned = learned_checkpoint(iter(checkpoints), tokens, batch_size=4)
    with torch.no_grad():
        correct = torch.stack([m(input_ids=tokens).logits[:, :-1].argmax(-1) == tokens[:, 1:] for m in checkpoints])
    for chunk in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            flags = correct[:, chunk, t].tolist()
            assert learned[chunk, t] == next((k for k in range(len(flags)) if all(flags[k:])), -1)
    assert len(set(learned.flatten().tolist())) >= 3 and (learned == -1).any()

    result = add_learning_order(prediction_depth(view, random_lens, tokens), learned, list("abcdef"))
    kept = learned >= 0
    assert result.spearman_depth_learned == pytest.approx(spearmanr(result.depths[kept], learned[kept]).statistic)
    report = result.to_json()
    assert report["learned"].count(None) == int((~kept).sum()) and report["checkpoints"] == list("abcdef")


def test_spearman_of_constant_is_nan():
    assert spearman(torch.zeros(5), torch.arange(5.0)) != spearman(torch.zeros(5), torch.arange(5.0))


def test_bad_input_errors(view, tokens, random_init_dir):
    with pytest.raises(LensLabError, match="n_chunks >= 1, seq_len >= 2"):
        prediction_depth(view, LogitLens(view), tokens[:, :1])
    with pytest.raises(LensLabError, match="n_chunks >= 1"):
        prediction_depth(view, LogitLens(view), tokens[:0])
    with pytest.raises(LensLabError, match="No checkpoints"):
        learned_checkpoint(iter([]), tokens)
    result = prediction_depth(view, LogitLens(view), tokens)
    with pytest.raises(LensLabError, match="same --data tokens"):
        add_learning_order(result, torch.zeros(2, 3, dtype=torch.long), ["x"])
    small = AutoModelForCausalLM.from_config(view.model.config.__class__(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(LensLabError, match="outside the vocabulary of checkpoint 1"):
        learned_checkpoint(iter([small]), tokens)


def test_cli_writes_depths_histogram_and_learning_order(tiny_lm, random_init_dir, tmp_path, capsys):
    output = tmp_path / "depth.json"
    code = main([
        "depth", "--model", str(tiny_lm.directory), "--data", str(tiny_lm.heldout_text_path),
        "--tokens", "256", "--seq-len", "32", "--output", str(output),
        "--checkpoints", str(random_init_dir), str(tiny_lm.directory),
    ])  # fmt: skip
    assert code == 0
    report = json.loads(output.read_text())
    assert len(report["depths"]) == len(report["losses"]) == len(report["learned"]) == 8 * 31
    assert report["lens"] == "logit" and report["checkpoints"][-1] == str(tiny_lm.directory)
    assert isinstance(report["spearman_depth_loss"], float) and "spearman_depth_learned" in report
    assert output.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)
    assert "Prediction depth" in capsys.readouterr().out
