"""Transfer of a base model's tuned lens to a fine-tuned copy (`lenslab.applications.transfer`, `lenslab transfer`)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from support.tiny_lm import generate_corpus, load_tiny_lm, pack, read_documents
from tiny_models import tiny_model

from lenslab.adapter import ModelView
from lenslab.applications.transfer import BASE_TUNED, LOGIT, OWN_TUNED, transfer_lenses
from lenslab.cli import main
from lenslab.errors import LensLabError
from lenslab.evaluate import evaluate_lenses
from lenslab.lenses import TunedLens
from lenslab.train import TrainConfig, train_lens

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def base_lens_dir(tiny_lm, tmp_path_factory):
    """A tuned lens trained briefly on the base tiny LM, saved."""
    chunks = pack(tiny_lm.tokenizer, read_documents(tiny_lm.train_text_path)[:400], 64)
    config = TrainConfig(steps=40, tokens_per_step=16 * 64, batch_size=16, checkpoint_every=0)
    lens = train_lens(ModelView.from_model(tiny_lm.model), chunks, config, progress=False).lens
    return lens.save(tmp_path_factory.mktemp("base_lens"))


@pytest.fixture(scope="module")
def finetuned_dir(tiny_lm, tmp_path_factory):
    """The tiny LM after 40 AdamW steps on lower-cased text from another seed of its grammar, saved."""
    copy = load_tiny_lm(tiny_lm.directory)  # a private copy: the session's model stays as trained
    model = copy.model.train().requires_grad_(True)
    chunks = pack(copy.tokenizer, [doc.lower() for doc in generate_corpus(400, seed=7)], 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        batch = chunks[torch.randint(len(chunks), (8,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    directory = tmp_path_factory.mktemp("finetuned")
    model.eval().save_pretrained(directory)
    copy.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def finetuned_view(finetuned_dir) -> ModelView:
    return ModelView.from_model(load_tiny_lm(finetuned_dir).model.requires_grad_(False))


def test_base_lens_beats_the_finetuned_logit_lens(tiny_lm, base_lens_dir, finetuned_view, caplog):
    with pytest.raises(LensLabError, match="check='shapes'"):  # fine-tuning changed the unembedding
        TunedLens.load(base_lens_dir, finetuned_view)
    with caplog.at_level(logging.WARNING, logger="lenslab.applications.transfer"):
        lenses, note = transfer_lenses(finetuned_view, base_lens_dir)
    assert "relaxed to shapes" in caplog.text and note["check"] == "shapes"
    assert note["base_model"] == str(tiny_lm.directory)
    assert sorted(lenses) == sorted([BASE_TUNED, LOGIT])

    tokens = pack(tiny_lm.tokenizer, read_documents(tiny_lm.heldout_text_path)[:40], 64)[:8]
    result = evaluate_lenses(finetuned_view, lenses, tokens)
    base, logit = result.lenses[BASE_TUNED], result.lenses[LOGIT]
    inner = slice(0, finetuned_view.num_layers)  # the last position is the model itself for every lens
    assert sum(base.kl[inner]) < 0.7 * sum(logit.kl[inner])
    assert sum(base.ce[inner]) < sum(logit.ce[inner])


def test_shape_mismatch_and_own_lens_errors(base_lens_dir, finetuned_view, tmp_path):
    other = TunedLens.from_model(tiny_model("gpt2")).save(tmp_path / "other")
    with pytest.raises(LensLabError, match="Hidden size mismatch|layers but model"):
        transfer_lenses(finetuned_view, other)
    # The own lens keeps the full check: the base lens is not the fine-tuned model's own.
    with pytest.raises(LensLabError, match="own lens .* was trained for another model") as error:
        transfer_lenses(finetuned_view, base_lens_dir, own_lens_dir=base_lens_dir)
    assert "--allow-model-mismatch" not in str(error.value)  # a flag transfer does not have


def test_cli_scores_transfer_like_eval(tiny_lm, base_lens_dir, finetuned_dir, finetuned_view, tmp_path, capsys, caplog):
    # An untrained lens of the fine-tuned model stands in for its own lens: it is loadable with the full check.
    own = TunedLens.from_model(finetuned_view).save(tmp_path / "own")
    output = tmp_path / "transfer.json"
    code = main([
        "transfer", "--lens", str(base_lens_dir), "--model", str(finetuned_dir), "--own-lens", str(own),
        "--data", str(tiny_lm.heldout_text_path), "--tokens", "512", "--seq-len", "64", "--output", str(output),
        "--units", "nats",
    ])  # fmt: skip
    assert code == 0
    report = json.loads(output.read_text())
    assert set(report["lenses"]) == {BASE_TUNED, LOGIT, OWN_TUNED}
    assert report["lens_transfer"]["check"] == "shapes" and report["lens_paths"][BASE_TUNED] == str(base_lens_dir)
    assert report["lenses"][OWN_TUNED]["kl"] == pytest.approx(report["lenses"][LOGIT]["kl"])  # untrained = logit lens
    assert output.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)
    assert "relaxed to shapes" in caplog.text
    assert "held-out tokens" in capsys.readouterr().out  # the table of `lenslab eval`
