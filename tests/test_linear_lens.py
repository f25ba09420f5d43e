"""The linear lens (`lenslab train --kind linear`): the fast recipe's closed-form start, kept as a lens of its own.

- it is exactly the start a tuned-lens run of the same tokens begins from, with no SGD step;
- on the trained tiny LM it is closer to the model than the logit lens on held-out text;
- `lenslab train --kind linear` saves it as kind "linear", with the folder rules of every run (a finished run is
  left as it is, another configuration refused, an interrupted fit starts over), and `lenslab eval` names it;
- `train --help` says what it is and how many tokens it reads; the fit reports progress over every token it reads.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from lenslab.adapter import ModelView
from lenslab.cli import build_parser, main
from lenslab.evaluate import evaluate_lenses
from lenslab.lens_files import load_lens
from lenslab.lenses import LinearLens, LogitLens, TunedLens
from lenslab.train import TrainConfig, loop, train_lens
from lenslab.train.closed_form import fit_closed_form, tokens_read
from lenslab.train.distributed import Processes
from lenslab.train.linear_fit import fit_linear_lens
from lenslab.train.run import LINEAR_TOKENS

SEQ_LEN = 32


def chunks(tiny_lm, path, sequences: int) -> torch.Tensor:
    """The first `sequences` chunks of SEQ_LEN tokens of a text file: [sequences, SEQ_LEN]."""
    ids = tiny_lm.tokenizer(path.read_text()[: sequences * SEQ_LEN * 8], return_tensors="pt").input_ids[0]
    return ids[: sequences * SEQ_LEN].reshape(sequences, SEQ_LEN)


def test_the_linear_lens_is_the_fast_recipes_start(tiny_lm, monkeypatch):
    view = ModelView.from_model(tiny_lm.model)
    tokens = chunks(tiny_lm, tiny_lm.train_text_path, 16)
    starts = []

    def recording(view, lens, *args, **kwargs):
        start = fit_closed_form(view, lens, *args, **kwargs)
        starts.append({name: tensor.clone() for name, tensor in lens.state_dict().items()})
        return start

    monkeypatch.setattr(loop, "fit_closed_form", recording)
    config = TrainConfig(steps=1, tokens_per_step=2 * SEQ_LEN, init_tokens=tokens.numel(), seed=3, batch_size=4)
    train_lens(view, tokens, config, progress=False)
    fitted = fit_linear_lens(view, tokens, ridge=config.ridge, seed=3, micro_batch=5, progress=False)

    assert len(starts) == 1 and isinstance(fitted.lens, LinearLens) and fitted.tokens == tokens.numel()
    assert fitted.shrinkage is not None and len(fitted.shrinkage) == view.num_layers
    state = fitted.lens.state_dict()
    assert state.keys() == starts[0].keys()
    for name, tensor in starts[0].items():
        assert tensor.abs().max() > 0, name  # a fitted map, not the logit lens's zeros
        torch.testing.assert_close(state[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_the_linear_lens_beats_the_logit_lens_on_heldout_text(tiny_lm):
    view = ModelView.from_model(tiny_lm.model)
    fitted = fit_linear_lens(view, chunks(tiny_lm, tiny_lm.train_text_path, 32), progress=False)
    heldout = chunks(tiny_lm, tiny_lm.heldout_text_path, 8)
    result = evaluate_lenses(view, {"logit": LogitLens(view), "linear": fitted.lens}, heldout)
    logit, linear = result.lenses["logit"].kl[:-1], result.lenses["linear"].kl[:-1]  # the last is the model's own
    assert sum(linear) < 0.5 * sum(logit)
    assert linear[0] < logit[0]  # the embeddings, furthest from the output, gain the most


def train_linear(tiny_lm, output, *extra: str) -> int:
    return main([
        "train", "--kind", "linear", "--model", str(tiny_lm.directory), "--data", str(tiny_lm.train_text_path),
        "--device", "cpu", "--seq-len", str(SEQ_LEN), "--heldout-tokens", "0", "--train-tokens", str(16 * SEQ_LEN),
        "--output", str(output), *extra,
    ])  # fmt: skip


def test_train_kind_linear_saves_reloads_and_keeps_the_folder_rules(tiny_lm, tmp_path, capsys, monkeypatch):
    output = tmp_path / "linear"
    assert train_linear(tiny_lm, output) == 0
    out = capsys.readouterr().out
    assert f"saved the linear lens to {output}: least squares on {16 * SEQ_LEN:,} tokens" in out
    assert json.loads((output / "config.json").read_text())["kind"] == "linear"
    lens = load_lens(output, ModelView.from_model(tiny_lm.model))
    assert type(lens) is LinearLens and lens.metadata["tokens"] == 16 * SEQ_LEN
    with pytest.raises(Exception, match="is a 'linear' lens, not a 'tuned' lens"):
        TunedLens.load(output, tiny_lm.model)

    before = (output / "params.safetensors").read_bytes()
    assert train_linear(tiny_lm, output) == 0  # the same command again leaves the finished lens as it is
    assert f"{output} already holds the linear lens of this configuration" in capsys.readouterr().out
    assert (output / "params.safetensors").read_bytes() == before
    assert train_linear(tiny_lm, output, "--ridge", "0.01") == 2
    assert "different configuration (differing in config.ridge)" in capsys.readouterr().err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lenslab.train.linear_fit.fit_closed_form", interrupted)
    assert train_linear(tiny_lm, tmp_path / "stopped") == 130
    said = capsys.readouterr().err.strip().splitlines()[-1]
    starts_over = "no checkpoint was written, so running the same command again starts over."
    assert said == f"lenslab train: interrupted; {starts_over}"
    assert not (tmp_path / "stopped").exists()  # a run that wrote nothing leaves no folder behind


def test_eval_names_a_linear_lens_by_its_kind(tiny_lm, tmp_path):
    view = ModelView.from_model(tiny_lm.model)
    fitted = fit_linear_lens(view, chunks(tiny_lm, tiny_lm.train_text_path, 8), progress=False)
    fitted.lens.save(tmp_path / "lens-folder")
    output = tmp_path / "eval.json"
    assert main([
        "eval", "--model", str(tiny_lm.directory), "--data", str(tiny_lm.heldout_text_path), "--device", "cpu",
        "--seq-len", str(SEQ_LEN), "--tokens", "256", "--output", str(output), "--lens", str(tmp_path / "lens-folder"),
    ]) == 0  # fmt: skip
    document = json.loads(output.read_text())
    assert list(document["lenses"]) == ["logit", "linear"]
    assert document["kinds"] == {"logit": "logit", "linear": "linear"}


def test_train_help_documents_the_linear_kind():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    kind = next(action for action in train._actions if action.dest == "kind")
    assert kind.choices == ("tuned", "linear", "jacobian") and kind.default == "tuned"
    text = " ".join(train.format_help().split())
    assert "--kind linear keeps that closed-form fit alone, with no training step" in text
    assert f"it reads {LINEAR_TOKENS:,} tokens unless --train-tokens says otherwise" in text
    assert f"for the linear lens {LINEAR_TOKENS}" in text


def test_the_fit_reports_progress_over_every_token_it_reads():
    view = ModelView.from_model(tiny_model("gpt2"))
    tokens = torch.randint(3, VOCAB, (10, 16), generator=torch.Generator().manual_seed(0))
    read: list[int] = []
    fit_closed_form(view, LinearLens.from_model(view), tokens, 3, 1e-4, Processes(), progress=read.append)
    assert sum(read) == tokens_read(tokens, Processes()) == tokens.numel()
    assert read == [48, 48, 48, 16]  # 9 fitted sequences in micro-batches of 3, then the held-out one
    assert tokens_read(tokens, Processes(rank=1, world_size=2)) == 4 * 16  # odd fitted rows; no held-out row
