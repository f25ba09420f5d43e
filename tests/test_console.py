"""What every command prints (`lenslab.cli.console`, `lenslab.plots.summaries`): tables within 80 columns with
shortened names, footnotes broken between phrases, and a two-line reading on stdout."""

from __future__ import annotations

from pathlib import Path

import pytest

from lenslab.cli import console
from lenslab.evaluate import EvalResult, LensMetrics
from lenslab.plots.summaries import eval_summary, shorten
from lenslab.report import WIDTH, Report


def metrics(kl: list[float], top1: list[float]) -> LensMetrics:
    n = len(kl)
    return LensMetrics(ce=[3.0] * n, perplexity=[20.0] * n, kl=kl, entropy=[2.0] * n, top1_agreement=top1,
                       bias_kl=[0.1] * n)  # fmt: skip


@pytest.fixture
def result() -> EvalResult:
    """The logit lens and two tuned lenses with long folder names, on a three-layer model."""
    return EvalResult(
        model="/models/a-model-whose-directory-name-is-longer-than-a-title", tokens=4096, nats_to_bits_per_byte=0.4,
        layers=["embeddings", "layer 1", "layer 2", "layer 3"], final_ce=2.5, final_entropy=2.2,
        lenses={
            "logit": metrics([4.0, 2.0, 1.0, 0.0], [0.1, 0.3, 0.6, 1.0]),
            "tuned-lens-from-the-first-run": metrics([1.0, 0.5, 0.2, 0.0], [0.4, 0.6, 0.8, 1.0]),
            "tuned-lens-from-the-second-run": metrics([3.0, 2.5, 0.5, 0.0], [0.2, 0.2, 0.4, 1.0]),
        },
        kinds={"logit": "logit", "tuned-lens-from-the-first-run": "tuned", "tuned-lens-from-the-second-run": "tuned"},
    )  # fmt: skip


def test_names_are_shortened_to_the_column():
    assert shorten("tuned") == "tuned"
    assert shorten("/models/gpt2/") == "gpt2"  # a path's last part
    assert shorten("tuned-lens-from-the-first-run", 10) == "tune…t-run"  # 10 characters, both ends kept


def test_an_eval_table_fits_80_columns_and_tells_same_kind_lenses_apart(result, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: the table still keeps to 80
    console.show(eval_summary(result, [Path("eval.json")]))
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines[:-2]) <= WIDTH  # the reading after the tables is free to wrap
    # Lens names shortened whole into the headers of each metric's table, the model's in the first title.
    assert (
        out.count("tune…t-run") == 3 and out.count("tune…d-run") == 3 and "a-model-whose-…er-than-a-title, 4,096" in out
    )
    assert "│ embeddings │ 1.600 │" in out and "│ layer 3    │ 100.0% │" in out  # KL in bits/byte, top-1 in %
    # The reading: each trained lens against the logit lens, then where top-1 first agrees.
    first, second = lines[-2:]
    assert first == (
        "the tuned lens (tuned-lens-from-the-first-run) is closer to the model than the logit lens at every layer; "
        "largest gap at embeddings; the tuned lens (tuned-lens-from-the-second-run) is closer to the model than the "
        "logit lens at 2 of 3 layers; largest gap at embeddings"
    )
    assert second == (
        "top-1 agrees with the model on most tokens: logit from layer 2, tuned-lens-from-the-first-run from layer "
        "1, tuned-lens-from-the-second-run from layer 3"
    )


def test_footnotes_break_between_phrases_only():
    notes = ["model CE 2.500 nats/token", "entropy 2.200 nats/token", "CE 1.000 bits/byte", "1 nat/token = 0.4"]
    lines = console.footer(notes, 60)
    assert lines == ["model CE 2.500 nats/token; entropy 2.200 nats/token", "CE 1.000 bits/byte; 1 nat/token = 0.4"]
    assert console.footer(["x" * 70, "short"], 60) == ["x" * 70, "short"]  # too long for a line: a line of its own
    assert console.footer([], 60) == []


def test_a_report_ends_with_the_files_then_the_reading(capsys):
    console.show(Report(("first line", "second line"), [Path("a.json"), Path("b.png")], footnotes=["a note"]))
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-2:] == ["first line", "second line"] and "a note" in captured.out
    assert "Wrote a.json, b.png" in captured.err


def test_a_library_call_is_run_with_progress_and_its_report_shown(capsys, monkeypatch):
    def call(spec: str, *, stage) -> Report:
        advance = stage("working", 2)
        advance(2)
        return Report((f"done with {spec}", "nothing else"))

    monkeypatch.setattr(console, "example_call", call, raising=False)
    assert console.run("lenslab.cli.console:example_call", ["the spec"]) == 0
    assert capsys.readouterr().out.splitlines() == ["done with the spec", "nothing else"]
