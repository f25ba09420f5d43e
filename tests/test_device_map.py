"""Models spread by a device map (accelerate): residuals, lenses, training and evaluation equal the model on one device.

No test machine has two accelerators, so the device maps here put some parts in CPU memory and the rest on disk:
accelerate then hooks every module, keeps the disk-offloaded weights on the meta device between forwards and loads
them for each one, which is the machinery that also moves activations between GPUs. Moving tensors between devices
is checked with a stand-in hook that places a layer on the meta device.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from support.random_lens import random_tuned_lens
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from lenslab.adapter import ModelView
from lenslab.cli import main
from lenslab.cli.flags import MODEL
from lenslab.errors import LensLabError
from lenslab.evaluate import evaluate_lenses
from lenslab.lenses import LogitLens, TunedLens
from lenslab.loading import load_model
from lenslab.specs import max_memory
from lenslab.train import TrainConfig, train_lens

ATOL = 1e-5


def cpu_and_disk_map(view: ModelView) -> dict[str, str]:
    """A device map of ``view``'s model with layers alternately on disk and in CPU memory, the final norm in CPU
    memory and every other part (embeddings, unembedding, OPT's projections) on disk."""
    device_map = {}
    for name in view.model.state_dict():
        owner = name.rsplit(".", 1)[0]
        if owner.startswith(f"{view.layers_path}."):
            layer = int(owner.removeprefix(f"{view.layers_path}.").split(".")[0])
            device_map[f"{view.layers_path}.{layer}"] = "disk" if layer % 2 == 0 else "cpu"
        else:
            device_map[owner] = "cpu" if owner == view.final_norm_path else "disk"
    return device_map


def dispatched_copy(view: ModelView, directory: Path) -> ModelView:
    """``view``'s model saved to ``directory`` and loaded back spread over CPU memory and disk."""
    view.model.save_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, device_map=cpu_and_disk_map(view)).eval()
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    return ModelView.from_model(model)


# llama: untied head; gptj: an lm_head bias; opt-350m: project_out and no final norm; gemma2: a logit softcap.
@pytest.mark.parametrize("family", ["llama", "gptj", "opt-350m", "gemma2"])
def test_dispatched_model_gives_the_same_residuals_and_lenses(family, tmp_path):
    plain = ModelView.from_model(tiny_model(family))
    dispatched = dispatched_copy(plain, tmp_path / "model")  # from_model checks that the logit lens decodes
    assert (dispatched.layers_path, dispatched.final_norm_path, dispatched.unembed_path) == (
        plain.layers_path, plain.final_norm_path, plain.unembed_path,
    )  # fmt: skip
    assert dispatched.model.get_output_embeddings().weight.is_meta  # offloaded to disk, read back when needed
    assert torch.equal(dispatched.unembedding_weight(), plain.unembedding_weight())
    assert dispatched.vocab_size == plain.vocab_size and dispatched.device == plain.device

    input_ids = torch.randint(3, plain.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    tuned = random_tuned_lens(plain)
    tuned.save(tmp_path / "lens")
    loaded = TunedLens.load(tmp_path / "lens", dispatched)  # the unembedding fingerprint must match
    with torch.no_grad():
        expected, got = plain.capture(input_ids), dispatched.capture(input_ids)
        torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(dispatched.decode(got.hidden[-1]), got.logits, atol=ATOL, rtol=0)
        for position, (h, h_plain) in enumerate(zip(got.hidden, expected.hidden, strict=True)):
            torch.testing.assert_close(h, h_plain, atol=ATOL, rtol=0)
            torch.testing.assert_close(loaded(h, position), tuned(h_plain, position), atol=ATOL, rtol=0)


def test_translators_sit_on_the_device_of_their_layer_and_move_residuals_there():
    view = ModelView.from_model(tiny_model("gpt_neox"))  # 3 layers
    # A stand-in for the hook accelerate puts on a layer it dispatches to another device.
    view.layers[1]._hf_hook = SimpleNamespace(execution_device="meta")
    assert [view.residual_device(p).type for p in range(view.num_positions)] == ["cpu", "cpu", "meta", "cpu"]
    lens = TunedLens.from_model(view)
    assert [t.weight.device.type for t in lens.translators] == ["cpu", "cpu", "meta"]
    assert lens.to(torch.float64).translators[2].weight.is_meta  # a dtype change keeps the placement
    h = torch.randn(1, 2, view.d_model, dtype=torch.float64)
    assert lens.transform(h, 2).is_meta and lens.transform(h, 1).device.type == "cpu"


@pytest.fixture(scope="module")
def heldout_tokens(tiny_lm) -> torch.Tensor:
    """[16, 32] token ids of the tiny LM's held-out text."""
    text = tiny_lm.heldout_text_path.read_text(encoding="utf-8")
    return torch.tensor(tiny_lm.tokenizer(text, verbose=False).input_ids[: 16 * 32]).view(16, 32)


@pytest.mark.parametrize("recipe", ["paper", "fast"])
def test_training_and_evaluation_on_a_dispatched_model_match_one_device(recipe, tiny_lm, heldout_tokens, tmp_path):
    plain = ModelView.from_model(tiny_lm.model)
    dispatched = dispatched_copy(plain, tmp_path / "model")
    config = TrainConfig(steps=2, tokens_per_step=128, init_tokens=256, recipe=recipe)
    trained = {}
    for name, view in (("plain", plain), ("dispatched", dispatched)):
        torch.manual_seed(0)
        trained[name] = train_lens(view, heldout_tokens, config, progress=False)
    for step, step_plain in zip(trained["dispatched"].history, trained["plain"].history, strict=True):
        assert step.loss == pytest.approx(step_plain.loss, rel=1e-4, abs=ATOL)
    for name, tensor in trained["dispatched"].lens.state_dict().items():
        torch.testing.assert_close(tensor, trained["plain"].lens.state_dict()[name], atol=ATOL, rtol=1e-4)

    results = {
        name: evaluate_lenses(view, {"logit": LogitLens(view), "tuned": trained[name].lens}, heldout_tokens[:4])
        for name, view in (("plain", plain), ("dispatched", dispatched))
    }
    for lens in ("logit", "tuned"):
        assert results["dispatched"].lenses[lens].kl == pytest.approx(results["plain"].lenses[lens].kl, abs=ATOL)
        assert results["dispatched"].lenses[lens].ce == pytest.approx(results["plain"].lenses[lens].ce, abs=ATOL)


def test_cli_eval_with_a_device_map_matches_one_device(tiny_lm, tmp_path):
    outputs = {}
    for name, extra in (("plain", []), ("dispatched", ["--device-map", "auto", "--max-memory", "cpu=800KB"])):
        outputs[name] = tmp_path / f"{name}.json"
        assert main([
            "eval", "--model", str(tiny_lm.directory), "--data", str(tiny_lm.heldout_text_path), "--device", "cpu",
            "--seq-len", "32", "--tokens", "256", "--output", str(outputs[name]), *extra,
        ]) == 0  # fmt: skip
    plain, dispatched = (json.loads(outputs[name].read_text())["lenses"]["logit"] for name in ("plain", "dispatched"))
    assert dispatched["kl"] == pytest.approx(plain["kl"], abs=ATOL)


def test_model_flags_pass_the_device_map_to_load_model(tiny_lm):
    parser = argparse.ArgumentParser()
    MODEL.add_to(parser)
    args = parser.parse_args(["--model", str(tiny_lm.directory), "--device-map", "auto", "--max-memory", "cpu=800KB"])
    assert args.max_memory == {"cpu": "800KB"}
    model = MODEL.build(args).load().model
    assert "disk" in model.hf_device_map.values()  # 800 KB of CPU memory do not hold all of it
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_max_memory_flag_parses_device_sizes_and_refuses_others():
    parsed = max_memory("0=20GiB, 1=1.5GB,cpu=100MiB,disk=1000")
    assert parsed == {0: "20GiB", 1: "1.5GB", "cpu": "100MiB", "disk": 1000}
    for bad in ("0:20GiB", "gpu=1GiB", "cpu=20 GiB", "cpu=1TB"):
        with pytest.raises(ValueError, match="DEVICE=SIZE"):
            max_memory(bad)


def test_device_map_options_need_a_device_map_and_accelerate(tiny_lm, monkeypatch):
    with pytest.raises(LensLabError, match="device_map='auto'"):
        load_model(str(tiny_lm.directory), max_memory={"cpu": "1GiB"})
    monkeypatch.setattr("lenslab.loading.is_accelerate_available", lambda: False)
    with pytest.raises(LensLabError, match="pip install accelerate"):
        load_model(str(tiny_lm.directory), device_map="auto")
