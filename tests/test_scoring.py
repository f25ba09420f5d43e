"""Scoring lenses on held-out text (`lenslab.scoring`): the tokens read, progress per batch, transfer matrices on
request, and a lens refused text it was trained on."""

from __future__ import annotations

import logging

import pytest

from lenslab.adapter import ModelView
from lenslab.data import DataSpec
from lenslab.errors import LensLabError
from lenslab.evaluate import evaluate_lenses
from lenslab.lenses import LogitLens, TunedLens
from lenslab.loading import LoadedModel
from lenslab.scoring import check_heldout, score_heldout
from lenslab.specs import TextSpec

SEQ_LEN = 32


@pytest.fixture(scope="module")
def setup(tiny_lm):
    view = ModelView.from_model(tiny_lm.model)
    lenses = {"logit": LogitLens(view), "tuned": TunedLens(view)}
    return LoadedModel(tiny_lm.model, tiny_lm.tokenizer), view, lenses


def test_scores_are_those_of_evaluate_on_the_first_heldout_tokens(tiny_lm, setup):
    loaded, view, lenses = setup
    text = TextSpec(data=str(tiny_lm.heldout_text_path), seq_len=SEQ_LEN)
    stages: list[tuple[str, int]] = []
    ticks: list[int] = []

    def stage(description: str, total: int):
        stages.append((description, total))
        return ticks.append

    scores = score_heldout(loaded, view, lenses, text, tokens=4 * SEQ_LEN, batch_size=3, transfer=["tuned"],
                           stage=stage)  # fmt: skip
    assert scores.seq_len == SEQ_LEN and str(tiny_lm.heldout_text_path) in scores.source
    # 4 sequences in batches of 3: two ticks for the scores and two for the transfer matrix.
    assert stages == [("scoring lenses", 2), ("transfer matrix of tuned", 2)] and ticks == [1, 1, 1, 1]
    assert list(scores.result.transfer) == ["tuned"] and scores.result.kinds == {"logit": "logit", "tuned": "tuned"}
    heldout = text.tokens(loaded, heldout=4 * SEQ_LEN).heldout
    assert heldout.shape == (4, SEQ_LEN)
    direct = evaluate_lenses(view, lenses, heldout, batch_size=4)
    assert scores.result.lenses["logit"].kl == pytest.approx(direct.lenses["logit"].kl, abs=1e-5)
    # An untrained tuned lens is the logit lens.
    assert scores.result.lenses["tuned"].ce == pytest.approx(scores.result.lenses["logit"].ce, abs=1e-5)


def trained_on(lens, *, source: str, heldout_tokens: int, seq_len: int):
    lens.metadata = {"data": {"source": source, "heldout_tokens": heldout_tokens, "seq_len": seq_len}}
    return lens


def test_a_lens_is_refused_its_own_training_text(tiny_lm, setup):
    _, view, _ = setup
    source = str(tiny_lm.train_text_path)
    lens = trained_on(TunedLens(view), source=source, heldout_tokens=4 * SEQ_LEN, seq_len=SEQ_LEN)
    spec = DataSpec(source)
    check_heldout({"tuned": lens}, spec, tiny_lm.tokenizer, tokens=4 * SEQ_LEN, seq_len=SEQ_LEN)  # what it held out
    with pytest.raises(LensLabError, match=r"--tokens 256 would score lens 'tuned' on its own training text.*"
                                           r"pass --tokens 128 or fewer\.$"):  # fmt: skip
        check_heldout({"tuned": lens}, spec, tiny_lm.tokenizer, tokens=8 * SEQ_LEN, seq_len=SEQ_LEN)
    nothing_held = trained_on(TunedLens(view), source=source, heldout_tokens=0, seq_len=SEQ_LEN)
    with pytest.raises(LensLabError, match="pass as --data text it was not trained on"):
        check_heldout({"tuned": nothing_held}, spec, tiny_lm.tokenizer, tokens=SEQ_LEN, seq_len=SEQ_LEN)


def test_another_source_only_warns_and_unrecorded_lenses_pass(tiny_lm, setup, caplog):
    _, view, lenses = setup
    lens = trained_on(TunedLens(view), source=str(tiny_lm.train_text_path), heldout_tokens=0, seq_len=SEQ_LEN)
    with caplog.at_level(logging.WARNING, logger="lenslab.scoring"):
        check_heldout({"tuned": lens}, DataSpec(str(tiny_lm.heldout_text_path)), tiny_lm.tokenizer, tokens=SEQ_LEN,
                      seq_len=SEQ_LEN)  # fmt: skip
    assert "is another source, so make sure it does not hold that training text" in caplog.text
    check_heldout(lenses, DataSpec(str(tiny_lm.train_text_path)), tiny_lm.tokenizer, tokens=10**6, seq_len=SEQ_LEN)
