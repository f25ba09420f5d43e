"""Anomaly detection from prediction trajectories (`lenslab.applications.detect`), its attack generator and
`lenslab detect`, on the trained tiny LM."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from support import tiny_lm as grammar
from support.tiny_lm import pack, read_documents

from lenslab.adapter import ModelView
from lenslab.applications.attacks import INJECTION_TEMPLATE, AttackConfig, make_attacks
from lenslab.applications.detect import (
    BASELINE,
    anomaly_scores,
    auroc_with_interval,
    choice_features,
    run_detection,
)
from lenslab.applications.prompts import ChoicePrompt, read_choice_prompts, write_choice_prompts
from lenslab.cli import main
from lenslab.errors import LensLabError
from lenslab.lenses import LogitLens, TunedLens
from lenslab.train import TrainConfig, train_lens

# Counting in the toy language, always up to "five," so that every normal prompt has the answer " six"; the
# choices are fixed, so trajectories line up column by column.
NUMBERS = grammar._NUMBERS
CHOICES = [" " + number for number in NUMBERS[3:9]]  # four .. nine
SIX = CHOICES.index(" six")
# Four facts with fixed choices, for the attack generator.
COUNTRIES = grammar._COUNTRIES[:4]
CAPITALS = [" " + grammar._CAPITALS[country] for country in COUNTRIES]


@pytest.fixture(scope="module")
def view(tiny_lm) -> ModelView:
    return ModelView.from_model(tiny_lm.model)


@pytest.fixture(scope="module")
def tuned_lens(tiny_lm, view) -> TunedLens:
    chunks = pack(tiny_lm.tokenizer, read_documents(tiny_lm.train_text_path)[:400], 64)
    config = TrainConfig(steps=30, tokens_per_step=16 * 64, batch_size=16, checkpoint_every=0)
    return train_lens(view, chunks, config, progress=False).lens


def counting_prompt(rng: random.Random, anomalous: bool) -> ChoicePrompt:
    """ "<Name> counted <a>, ..., five," or, anomalous, the same followed by a wrong number word three times.

    The repetition is a pattern the model never saw in training, and it pulls its answer toward the repeated word.
    """
    text = f"{rng.choice(grammar._NAMES)} counted {', '.join(NUMBERS[rng.randrange(4) : 5])},"
    if anomalous:
        word = rng.choice([choice for choice in CHOICES if choice != " six"])
        text += f"{word}{word}{word},"
    return ChoicePrompt(text, CHOICES, answer=SIX, label="anomalous" if anomalous else "normal")


@pytest.fixture(scope="module")
def fact_prompts(tiny_lm) -> list[ChoicePrompt]:
    """ "<a held-out sentence> The capital of <country> is" for four countries, with their capitals as choices."""
    rng = random.Random(0)
    documents = read_documents(tiny_lm.heldout_text_path)
    sentences = [s.strip() + "." for doc in documents for s in doc.split(".") if s.strip()]
    prompts = []
    for _ in range(80):
        answer = rng.randrange(len(COUNTRIES))
        prompt = f"{rng.choice(sentences)} The capital of {COUNTRIES[answer]} is"
        prompts.append(ChoicePrompt(prompt, CAPITALS, answer=answer))
    return prompts


def test_detectors_find_a_pattern_that_changes_the_answer(tiny_lm, view, tuned_lens):
    rng = random.Random(0)
    normal = [counting_prompt(rng, anomalous=False) for _ in range(40)]
    test = [counting_prompt(rng, anomalous=index % 2 == 1) for index in range(40)]
    lenses = {"tuned": tuned_lens, "logit": LogitLens(view)}
    features = choice_features(view, tiny_lm.tokenizer, lenses, test)
    answers = features.trajectories["logit"][:, -1].argmax(-1)  # the model's own choice, at its output
    anomalous = np.array([prompt.label == "anomalous" for prompt in test])
    assert (answers[~anomalous] == SIX).all() and (answers[anomalous] != SIX).mean() >= 0.5

    report = run_detection(view, tiny_lm.tokenizer, lenses, normal, test, seed=0)
    assert set(report.detectors) == {
        "tuned/isolation_forest", "tuned/lof", "logit/isolation_forest", "logit/lof", BASELINE,
    }  # fmt: skip
    for score in report.detectors.values():
        assert score.ci95[0] <= score.auroc <= score.ci95[1]
    for name in ("tuned/isolation_forest", "tuned/lof"):
        assert report.detectors[name].auroc > 0.8 and report.detectors[name].ci95[0] > 0.6
    assert (report.n_normal, report.n_test_normal, report.n_test_anomalous) == (40, 20, 20)
    assert report.to_json()["detectors"]["tuned/lof"]["ci95"] == list(report.detectors["tuned/lof"].ci95)


def reference_features(model, tokenizer, lens, prompt: ChoicePrompt, positions: int) -> np.ndarray:
    """[positions, choices]: each prompt + choice run alone (no batching, no padding), every token scored."""
    prompt_ids = tokenizer(prompt.prompt)["input_ids"]
    scores = np.zeros((positions, len(prompt.choices)))
    for j, choice in enumerate(prompt.choices):
        ids = prompt_ids + tokenizer(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            logits = model(input_ids=torch.tensor([ids])).logits
        for layer in range(positions):
            for t in range(len(prompt_ids), len(ids)):
                # GPT-2's last hidden state is already normalised: the last position is the model's logits.
                layer_logits = lens(hidden[layer][0, t - 1], layer) if layer < positions - 1 else logits[0, t - 1]
                scores[layer, j] += layer_logits.log_softmax(-1)[ids[t]].item()
    return torch.from_numpy(scores).log_softmax(-1).numpy()


def test_choice_features_match_unbatched_reference(tiny_lm, view, tuned_lens):
    # Choices of one to several tokens, in batches that cut across prompts and pad to different lengths.
    prompts = [
        ChoicePrompt("The capital of Varnos", [" is", " is Kelti today.", " sells"]),
        ChoicePrompt("Elnu counted one, two,", [" three", " four, five", " seven"]),
        ChoicePrompt("The cats", [" chase the dog", " chases", " see"]),
    ]
    features = choice_features(view, tiny_lm.tokenizer, {"tuned": tuned_lens}, prompts, batch_size=4)
    for index, prompt in enumerate(prompts):
        expected = reference_features(tiny_lm.model, tiny_lm.tokenizer, tuned_lens, prompt, view.num_positions)
        np.testing.assert_allclose(features.trajectories["tuned"][index], expected, rtol=1e-4, atol=1e-4)
        ids = tiny_lm.tokenizer(prompt.prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            last = tiny_lm.model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        # The baseline's feature is the last residual before the final norm, which HF applies to its last state.
        residual = torch.from_numpy(features.final_residual[index]).float()
        torch.testing.assert_close(tiny_lm.model.transformer.ln_f(residual), last[0, -1], rtol=1e-4, atol=1e-4)


def test_bootstrap_interval_matches_roc_auc_score_per_resample():
    rng = np.random.default_rng(3)
    anomalous = np.arange(30) < 12
    scores = rng.normal(size=30).round(1) + anomalous  # rounded: ties must count one half, as in sklearn
    score = auroc_with_interval(anomalous, scores, resamples=200, seed=7)
    assert score.auroc == roc_auc_score(anomalous, scores)
    draws = np.random.default_rng(7)
    positive = draws.integers(0, 12, (200, 12))
    negative = draws.integers(0, 18, (200, 18))
    per_resample = [
        roc_auc_score(np.r_[np.ones(12), np.zeros(18)], np.r_[scores[anomalous][p], scores[~anomalous][n]])
        for p, n in zip(positive, negative)
    ]
    np.testing.assert_allclose(score.ci95, np.percentile(per_resample, [2.5, 97.5]))


@pytest.mark.parametrize("detector", ["isolation_forest", "lof", "mahalanobis"])
def test_detectors_score_outliers_higher(detector):
    rng = np.random.default_rng(0)
    normal = rng.normal(size=(60, 5))
    test = np.concatenate([rng.normal(size=(10, 5)), rng.normal(size=(10, 5)) + 6])
    scores = anomaly_scores(normal, test, detector)
    assert scores[10:].min() > scores[:10].max()


def test_attacks_label_and_place_as_documented():
    records = [ChoicePrompt(f"Question {i}\nAnswer:", [" yes", " no", " maybe"], answer=i % 3) for i in range(10)]
    injected = make_attacks(records, AttackConfig(kind="injection", fraction=0.3, seed=4))
    assert injected == make_attacks(records, AttackConfig(kind="injection", fraction=0.3, seed=4))
    assert [r.label for r in injected].count("anomalous") == 3
    for original, record in zip(records, injected):
        if record.label == "normal":
            assert record.prompt == original.prompt and record.attack is None
            continue
        first, injection, last = record.prompt.split("\n")
        assert (first, last, record.attack) == (f"Question {records.index(original)}", "Answer:", "injection")
        target = next(c for c in original.choices if injection == INJECTION_TEMPLATE.format(choice=c.strip()))
        assert target != original.choices[original.answer]

    fewshot = make_attacks(records, AttackConfig(kind="fewshot", fraction=0.5, seed=0, shots=2))
    by_prompt = {r.prompt: r for r in records}
    for original, record in zip(records, fewshot):
        *demonstrations, query = record.prompt.split("\n\n")
        assert query == original.prompt and len(demonstrations) == 2
        for demonstration in demonstrations:
            demo = next(by_prompt[p] for p in by_prompt if demonstration.startswith(p))
            correct = demonstration == demo.prompt + demo.choices[demo.answer]
            assert correct == (record.label == "normal")


def test_prompt_files_round_trip(tmp_path):
    records = make_attacks([ChoicePrompt("Q\nA:", [" x", " y"], answer=1)] * 4, AttackConfig(fraction=0.5))
    write_choice_prompts(tmp_path / "set.jsonl", records)
    assert read_choice_prompts(tmp_path / "set.jsonl", "--test") == records


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("not json", "line 2 is not valid JSON"),
        ('["a"]', "holds a list, not an object"),
        ('{"choices": [" a"]}', "no string 'prompt'"),
        ('{"prompt": "p", "choices": []}', "non-empty list of strings"),
        ('{"prompt": "p", "choices": [" a"], "answer": 3}', r"index of a choice \(0..0\)"),
        ('{"prompt": "p", "choices": [" a"], "label": "odd"}', "label='odd'"),
    ],
)
def test_malformed_prompt_files(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "choices": [" a"]}\n' + line + "\n")
    with pytest.raises(LensLabError, match=match):
        read_choice_prompts(path, "--test")


def test_bad_input_errors(tmp_path, tiny_lm, view, fact_prompts):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LensLabError, match="--normal .* holds no prompts"):
        read_choice_prompts(tmp_path / "empty.jsonl", "--normal")
    lenses = {"logit": LogitLens(view)}
    tokenizer = tiny_lm.tokenizer
    test = make_attacks(fact_prompts[:6], AttackConfig(fraction=0.5))
    with pytest.raises(LensLabError, match="Got 0 normal prompt"):
        run_detection(view, tokenizer, lenses, [], test)
    empty_choice = [ChoicePrompt("The cat", [" sees", ""], label="normal")]
    with pytest.raises(LensLabError, match="Choice '' of prompt 1 tokenizes to no tokens"):
        choice_features(view, tokenizer, lenses, empty_choice)
    two_choices = ChoicePrompt("x", [" a", " b"], label="normal")
    with pytest.raises(LensLabError, match="Prompt 11 has 2 choices but the first has 4"):
        run_detection(view, tokenizer, lenses, fact_prompts[:4], [*test, two_choices])
    all_normal = make_attacks(fact_prompts[:6], AttackConfig(fraction=0))
    with pytest.raises(LensLabError, match="test set holds 0 anomalous and 6 normal"):
        run_detection(view, tokenizer, lenses, fact_prompts[:4], all_normal)
    with pytest.raises(LensLabError, match="Test prompt 1 has no 'label'"):
        run_detection(view, tokenizer, lenses, fact_prompts[:4], fact_prompts[4:6])
    with pytest.raises(LensLabError, match="--normal holds prompts labelled 'anomalous'"):
        run_detection(view, tokenizer, lenses, test, test)
    with pytest.raises(LensLabError, match="no 'answer' field"):
        make_attacks([ChoicePrompt("p", [" a", " b"])] * 4, AttackConfig(kind="fewshot"))
    with pytest.raises(LensLabError, match="too few for 3 demonstrations"):
        make_attacks(fact_prompts[:3], AttackConfig(kind="fewshot"))
    with pytest.raises(LensLabError, match="--fraction 1.5"):
        AttackConfig(fraction=1.5)
    with pytest.raises(LensLabError, match="pass --kind one of injection, fewshot"):
        AttackConfig(kind="jailbreak")


def test_cli_make_attacks_then_detect(tmp_path, tiny_lm, tuned_lens, fact_prompts, capsys):
    write_choice_prompts(tmp_path / "mc.jsonl", fact_prompts[40:])
    write_choice_prompts(tmp_path / "normal.jsonl", fact_prompts[:40])
    tuned_lens.save(tmp_path / "lens")
    assert main([
        "make-attacks", "--input", str(tmp_path / "mc.jsonl"), "--output", str(tmp_path / "test.jsonl"),
        "--kind", "injection", "--fraction", "0.5", "--seed", "1",
    ]) == 0  # fmt: skip
    assert [r.label for r in read_choice_prompts(tmp_path / "test.jsonl", "--test")].count("anomalous") == 20
    output = tmp_path / "report.json"
    assert main([
        "detect", "--model", str(tiny_lm.directory), "--lens", str(tmp_path / "lens"), "--normal",
        str(tmp_path / "normal.jsonl"), "--test", str(tmp_path / "test.jsonl"), "--output", str(output),
        "--resamples", "200",
    ]) == 0  # fmt: skip
    report = json.loads(output.read_text())
    assert set(report["detectors"]) == {
        "tuned/isolation_forest", "tuned/lof", "logit/isolation_forest", "logit/lof", BASELINE,
    }  # fmt: skip
    lo, hi = report["detectors"]["tuned/isolation_forest"]["ci95"]
    assert lo <= report["detectors"]["tuned/isolation_forest"]["auroc"] <= hi
    out = capsys.readouterr().out
    assert "AUROC" in out and "isolation_forest" in out

    code = main(
        [
            "detect",
            "--model",
            str(tiny_lm.directory),
            "--features",
            "tuned",
            "--normal",
            str(tmp_path / "normal.jsonl"),
            "--test",
            str(tmp_path / "test.jsonl"),
            "--output",
            str(output),
        ]
    )
    assert code == 2 and "--features tuned needs a tuned lens" in capsys.readouterr().err
