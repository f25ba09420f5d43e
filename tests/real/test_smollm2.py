"""Every command on a real pretrained model (see conftest.py): what tiny models cannot show."""

from __future__ import annotations

import json
import random

import pytest
import torch
from support.real_model import EXAMPLE_TEXT, SEQ_LEN

from lenslab import LogitLens, TunedLens, load_model
from lenslab.applications.prompts import ChoicePrompt, write_choice_prompts
from lenslab.artifacts import TUNED_LENS_PARAMS_FILE, read_lens
from lenslab.cli import main
from lenslab.gguf import dequantised_folder

PNG_MAGIC = b"\x89PNG"
COUNTRIES = {"France": " Paris", "Japan": " Tokyo", "Italy": " Rome", "Egypt": " Cairo", "Spain": " Madrid"}


def common_flags(gguf, *extra) -> list[str]:
    return ["--model", str(gguf), "--device", "cpu", "--data", str(EXAMPLE_TEXT), "--seq-len", str(SEQ_LEN), *extra]


def test_the_model_is_the_real_one(smollm2, smollm2_view):
    config = smollm2.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    # Past 2^24 entries, where a float32 index once overflowed.
    assert smollm2_view.unembedding_weight().numel() > 2**24


def test_the_logit_lens_at_the_last_position_is_the_model(smollm2, smollm2_view):
    ids = smollm2.tokenizer("The Eiffel Tower is in the city of", return_tensors="pt").input_ids
    with torch.no_grad():
        residuals = smollm2_view.capture(ids)
        decoded = LogitLens(smollm2_view)(residuals.hidden[-1], smollm2_view.num_layers)
    assert torch.allclose(decoded, residuals.logits, atol=1e-4, rtol=1e-4)
    assert smollm2.tokenizer.decode(residuals.logits[0, -1].argmax()) == " Paris"


def test_the_dequantised_copy_is_reused(smollm2_gguf, monkeypatch):
    first = dequantised_folder(smollm2_gguf, torch.float32)
    monkeypatch.setattr("lenslab.gguf._convert", lambda *args: pytest.fail("converted the GGUF file again"))
    assert dequantised_folder(smollm2_gguf, torch.float32) == first
    reloaded = load_model(str(smollm2_gguf), device="cpu")
    assert reloaded.model.config.name_or_path == str(smollm2_gguf)


def test_a_lens_of_a_real_size_saves_and_loads_with_its_fingerprint(smollm2_view, tmp_path):
    lens = TunedLens.from_model(smollm2_view)
    with torch.no_grad():
        lens.translators[3].bias.fill_(0.25)
    loaded = TunedLens.load(lens.save(tmp_path / "lens"), smollm2_view)  # check="full": the fingerprint matches
    h = torch.randn(1, 4, smollm2_view.d_model)
    assert torch.equal(loaded(h, 3), lens(h, 3))


def test_the_trained_lens_is_closer_to_the_model_than_the_logit_lens_everywhere(smollm2_gguf, smollm2_lens, tmp_path):
    output = tmp_path / "eval.json"
    assert (
        main(["eval", *common_flags(smollm2_gguf, "--lens", str(smollm2_lens), "--tokens", "512", "-o", str(output))])
        == 0
    )
    lenses = json.loads(output.read_text())["lenses"]
    tuned, logit = lenses["tuned"]["kl"], lenses["logit"]["kl"]
    assert len(tuned) == 31
    assert all(ours < theirs for ours, theirs in zip(tuned[:-1], logit[:-1])), (tuned, logit)
    assert output.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("suffix", [".json", ".html", ".png"])
def test_show_writes_every_format(smollm2_gguf, smollm2_lens, tmp_path, suffix):
    output = tmp_path / f"show{suffix}"
    code = main(["show", "--model", str(smollm2_gguf), "--device", "cpu", "--lens", str(smollm2_lens), "-o",
                 str(output), "The Eiffel Tower is in the city of"])  # fmt: skip
    assert code == 0 and output.stat().st_size > 0
    if suffix == ".json":
        data = json.loads(output.read_text())
        assert set(data["lenses"]) >= {"logit", "tuned"}


def test_cbe_extracts_four_directions_of_one_layer(smollm2_gguf, smollm2_lens, tmp_path):
    output = tmp_path / "cbe"
    code = main(["cbe", *common_flags(smollm2_gguf, "--lens", str(smollm2_lens), "--layers", "15", "--k", "4",
                                      "--tokens", "256", "-o", str(output))])  # fmt: skip
    assert code == 0
    summary = json.loads((output / "summary.json").read_text())
    assert set(summary["layers"]) == {"15"}


def test_detect_depth_and_transfer_run(smollm2_gguf, smollm2_lens, tmp_path):
    rng = random.Random(0)
    countries = list(COUNTRIES)
    prompts = []
    for _ in range(24):
        country = rng.choice(countries)
        prompts.append(ChoicePrompt(f"The capital of {country} is", list(COUNTRIES.values()),
                                    answer=countries.index(country)))  # fmt: skip
    write_choice_prompts(tmp_path / "normal.jsonl", prompts[:12])
    write_choice_prompts(tmp_path / "pool.jsonl", prompts[12:])
    assert main(["make-attacks", "--input", str(tmp_path / "pool.jsonl"), "-o", str(tmp_path / "test.jsonl")]) == 0
    assert main([
        "detect", "--model", str(smollm2_gguf), "--device", "cpu", "--lens", str(smollm2_lens), "--normal",
        str(tmp_path / "normal.jsonl"), "--test", str(tmp_path / "test.jsonl"), "--resamples", "100",
        "-o", str(tmp_path / "detect.json"),
    ]) == 0  # fmt: skip
    detectors = json.loads((tmp_path / "detect.json").read_text())["detectors"]
    assert all(0 <= detector["auroc"] <= 1 for detector in detectors.values())

    assert main(["depth", *common_flags(smollm2_gguf, "--lens", str(smollm2_lens), "--tokens", "256",
                                        "-o", str(tmp_path / "depth.json"))]) == 0  # fmt: skip
    depths = json.loads((tmp_path / "depth.json").read_text())["depths"]
    assert len(depths) == 2 * (SEQ_LEN - 1) and all(0 <= depth <= 30 for depth in depths)

    assert main(["transfer", *common_flags(smollm2_gguf, "--lens", str(smollm2_lens), "--tokens", "256",
                                           "-o", str(tmp_path / "transfer.json"))]) == 0  # fmt: skip
    assert "lenses" in json.loads((tmp_path / "transfer.json").read_text())


def test_a_tuned_lens_format_lens_of_this_size_loads(smollm2_view, smollm2_lens, tmp_path):
    """The layout of the `tuned-lens` package: `config.json` + a `params.pt` state dict, read with weights_only."""
    config, tensors = read_lens(smollm2_lens)
    folder = tmp_path / "tuned-lens-format"
    folder.mkdir()
    state = {name.removeprefix("translators."): tensor for name, tensor in tensors.items()}
    torch.save(state, folder / TUNED_LENS_PARAMS_FILE)
    (folder / "config.json").write_text(json.dumps({
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "d_model": config.d_model,
        "num_hidden_layers": config.num_hidden_layers, "bias": True, "lens_type": "linear_tuned_lens",
    }))  # fmt: skip
    ours = TunedLens.load(smollm2_lens, smollm2_view)
    theirs = TunedLens.load(folder, smollm2_view, check="shapes")
    h = torch.randn(1, 3, smollm2_view.d_model)
    for position in (0, 15, 29):
        assert torch.equal(theirs(h, position), ours(h, position))
