"""`lenslab.causal.report`: the layers `--layers` names, the per-layer loop of `lenslab cbe` with its progress, and
the report's JSON."""

from __future__ import annotations

import json

import pytest
import torch

from lenslab.adapter import ModelView
from lenslab.causal import ExtractionConfig
from lenslab.causal.fast import FastConfig
from lenslab.causal.report import causal_report, parse_layers
from lenslab.errors import LensLabError
from lenslab.lenses import LogitLens


@pytest.mark.parametrize(
    ("text", "layers"), [("all", [0, 1, 2, 3]), (" ALL ", [0, 1, 2, 3]), ("3,0,3", [0, 3]), ("4", [4]), ("1,", [1])]
)
def test_layers_are_parsed_sorted_and_unique(text, layers):
    assert parse_layers(text, 4) == layers


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("first", r"--layers 'first' is not 'all' or a comma-separated list of integers; pass e\.g\. 0,3,5\."),
        ("1,5", r"--layers '1,5' names \[5\] layers outside the model's lens positions 0\.\.4"),
        (",", r"names no layers outside"),
    ],
)
def test_bad_layers_are_refused(text, message):
    with pytest.raises(LensLabError, match=message):
        parse_layers(text, 4)


@pytest.fixture(scope="module")
def view(tiny_lm) -> ModelView:
    return ModelView.from_model(tiny_lm.model)


def test_report_per_layer_with_a_progress_stage_each(view):
    ids = torch.randint(0, view.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    config = ExtractionConfig(k=2, fast=FastConfig(surrogate_steps=5, steps=4))
    stages: list[tuple[str, int]] = []
    done: dict[str, int] = {}

    def stage(description: str, total: int):
        stages.append((description, total))
        return lambda n: done.update({description: done.get(description, 0) + n})

    report = causal_report(view, LogitLens(view), ids, [2, 0], config, batch_size=2, stage=stage)
    assert [basis.layer for basis in report.bases] == [2, 0] and report.tokens == 36
    assert [f.layer for f in report.fidelities] == [2, 0] and [a.layer for a in report.alignments] == [2, 0]
    # Capture once, then per layer: the basis's steps and two passes over the sequences (fidelity, alignment).
    assert stages == [("capturing residuals", 3), *((f"layer {layer}: basis, fidelity, alignment", 4 + 6) for layer
                                                      in (2, 0))]  # fmt: skip
    assert done == {description: total for description, total in stages}
    document = json.loads(json.dumps(report.to_json(), allow_nan=False))  # JSON has no NaN: undefined is null
    assert (document["k"], document["method"], document["tokens"]) == (2, "fast", 36)
    assert list(document["layers"]) == ["2", "0"] and list(document["alignment"]) == ["2", "0"]
    layer = document["layers"]["2"]
    assert len(layer["lens_influence"]) == len(layer["model_influence"]) == 2
    assert layer["total_lens_influence"] == pytest.approx(sum(layer["lens_influence"]))


def test_a_bad_request_fails_before_any_forward(view, monkeypatch):
    monkeypatch.setattr("lenslab.causal.report.capture_sample", lambda *args, **kwargs: pytest.fail("ran a forward"))
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(LensLabError, match="--k is 1000 but the residual stream has"):
        causal_report(view, LogitLens(view), ids, [0], ExtractionConfig(k=1000))
    with pytest.raises(LensLabError, match="Layer 9 is out of range"):
        causal_report(view, LogitLens(view), ids, [0, 9], ExtractionConfig(k=2))
