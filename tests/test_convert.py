"""`lenslab convert`: lenses between lenslab folders, the Jacobian-lens artifact and the tuned-lens layout.

The tuned-lens package itself reads our tuned-lens export in `test_tuned_lens_package_loads_the_export`, run with a
separate interpreter that has tuned-lens installed (`LENSLAB_TUNED_LENS_PYTHON`, default /work/tl-venv/bin/python);
everything else checks the files and lenslab's own readers. TransformerLens's side is tests/test_transformer_lens.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from lenslab import ModelView, TunedLens
from lenslab.artifacts import CONFIG_FILE, PARAMS_FILE, TUNED_LENS_PARAMS_FILE, LensConfig, read_lens, write_lens
from lenslab.cli import main
from lenslab.convert import MANIFEST, convert_lens
from lenslab.errors import LensLabError, LensModelMismatch
from lenslab.jacobian import JacobianArtifact, JacobianLens, save_jacobian_artifact
from lenslab.lens_files import load_lens

TUNED_LENS_PYTHON = Path(os.environ.get("LENSLAB_TUNED_LENS_PYTHON", "/work/tl-venv/bin/python"))
TUNED_LENS_CONFIG_KEYS = {
    "base_model_name_or_path", "d_model", "num_hidden_layers", "bias", "base_model_revision", "unembed_hash",
    "lens_type",
}  # fmt: skip
"""The fields of tuned-lens 0.2's `TunedLensConfig`, which its `TunedLens.save` writes."""


@pytest.fixture(scope="module")
def view() -> ModelView:
    return ModelView.from_model(tiny_model("gpt2"))  # 2 layers: lens positions 0, 1, 2


def tuned(view: ModelView, *, bias: bool, seed: int = 0) -> TunedLens:
    """A tuned lens with random translators (and biases, if any)."""
    lens = TunedLens.from_model(view, bias=bias)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in lens.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return lens


def jacobian(view: ModelView, seed: int = 0) -> JacobianLens:
    generator = torch.Generator().manual_seed(seed)
    d, blocks = view.d_model, view.num_layers - 1
    return JacobianLens(view, torch.eye(d) + 0.1 * torch.randn(blocks, d, d, generator=generator), prompts=7)


def residuals(view: ModelView) -> torch.Tensor:
    return torch.randn(3, 5, view.d_model, generator=torch.Generator().manual_seed(1))


def assert_same_lens(actual, expected, view: ModelView, positions=None, **tolerance) -> None:
    h = residuals(view)
    for position in positions if positions is not None else range(view.num_positions):
        torch.testing.assert_close(actual.transform(h, position), expected.transform(h, position), **tolerance)


FP16 = {"rtol": 2e-3, "atol": 2e-3}
"""A J-lens artifact stores its matrices in float16."""


def test_bias_free_tuned_lens_becomes_a_j_lens_of_i_plus_a(view, tmp_path, caplog):
    lens = tuned(view, bias=False)
    lens.save(tmp_path / "tuned")
    conversion = convert_lens(tmp_path / "tuned", "jacobian-lens", tmp_path / "j.pt")
    raw = torch.load(tmp_path / "j.pt", weights_only=True)
    assert raw["source_layers"] == [0] and raw["d_model"] == view.d_model and raw["n_prompts"] == 0
    identity = torch.eye(view.d_model)
    torch.testing.assert_close(raw["J"][0].float(), identity + lens.translators[1].weight, **FP16)  # block 0 = pos 1
    # The embeddings' translator has no slot: dropped, said so, and read as the logit lens.
    assert conversion.dropped == ["the translator at the embeddings (lens position 0)"]
    assert "no matrix for the embeddings" in caplog.text
    loaded = load_lens(tmp_path / "j.pt", view, check="shapes")
    assert_same_lens(loaded, lens, view, positions=range(1, view.num_positions), **FP16)
    h = residuals(view)
    torch.testing.assert_close(loaded.transform(h, 0), h)


def test_a_lens_with_a_bias_is_refused_as_a_j_lens_and_nothing_is_written(view, tmp_path):
    tuned(view, bias=True).save(tmp_path / "tuned")
    with pytest.raises(LensLabError, match="biases up to .* would be lost"):
        convert_lens(tmp_path / "tuned", "jacobian-lens", tmp_path / "j.pt")
    assert not (tmp_path / "j.pt").exists()


def test_j_lens_becomes_a_tuned_lens_folder_in_the_tuned_lens_layout(view, tmp_path):
    source = jacobian(view)
    source.save(tmp_path / "jfolder")
    convert_lens(tmp_path / "jfolder", "tuned-lens", tmp_path / "tl", view=view)
    config = json.loads((tmp_path / "tl" / CONFIG_FILE).read_text())
    assert set(config) == TUNED_LENS_CONFIG_KEYS
    assert config["lens_type"] == "linear_tuned_lens" and config["bias"] is True
    assert config["d_model"] == view.d_model and config["num_hidden_layers"] == view.num_layers
    assert isinstance(config["unembed_hash"], str)  # from --model
    params = torch.load(tmp_path / "tl" / TUNED_LENS_PARAMS_FILE, weights_only=True)
    positions = range(view.num_layers)
    assert set(params) == {f"{p}.{name}" for p in positions for name in ("weight", "bias")}
    assert not params["0.weight"].any() and not any(params[f"{p}.bias"].any() for p in positions)
    torch.testing.assert_close(params["1.weight"], source.jacobian(1) - torch.eye(view.d_model))
    assert sorted(path.name for path in (tmp_path / "tl").iterdir()) == sorted([CONFIG_FILE, MANIFEST, "params.pt"])
    assert_same_lens(load_lens(tmp_path / "tl", view), source, view)


@pytest.mark.parametrize("bias", [True, False])
def test_tuned_lens_round_trips_through_the_tuned_lens_layout(view, tmp_path, bias):
    lens = tuned(view, bias=bias)
    lens.save(tmp_path / "lenslab")
    convert_lens(tmp_path / "lenslab", "tuned-lens", tmp_path / "tl")
    convert_lens(tmp_path / "tl", "lenslab", tmp_path / "back")
    back = load_lens(tmp_path / "back", view)
    assert back.kind == "tuned"
    assert_same_lens(back, lens, view)


def test_j_lens_artifact_round_trips_through_a_lenslab_folder_with_its_fingerprint(view, tmp_path):
    source = jacobian(view)
    source.save(tmp_path / "jfolder")
    convert_lens(tmp_path / "jfolder", "jacobian-lens", tmp_path / "j.pt")
    convert_lens(tmp_path / "j.pt", "lenslab", tmp_path / "back")  # no model: the artifact kept the record
    config = json.loads((tmp_path / "back" / CONFIG_FILE).read_text())
    assert config["kind"] == "jacobian" and config["unembed_fingerprint"] is not None
    back = load_lens(tmp_path / "back", view)
    assert back.prompts == 7
    assert_same_lens(back, source, view, **FP16)
    with pytest.raises(LensModelMismatch, match="unembedding differs"):
        load_lens(tmp_path / "back", ModelView.from_model(tiny_model("gpt2", seed=1)))


def test_a_transformer_lens_artifact_takes_its_depth_from_its_target_layer(view, tmp_path):
    d = view.d_model
    partial = JacobianArtifact({0: 2 * torch.eye(d)}, 3, d, {"target_layer": 4})  # block 0 of a 5-layer model
    save_jacobian_artifact(partial, tmp_path / "tl.pt")
    convert_lens(tmp_path / "tl.pt", "tuned-lens", tmp_path / "out")
    config = json.loads((tmp_path / "out" / CONFIG_FILE).read_text())
    assert config["num_hidden_layers"] == 5
    params = torch.load(tmp_path / "out" / TUNED_LENS_PARAMS_FILE, weights_only=True)
    torch.testing.assert_close(params["1.weight"], torch.eye(d))  # J = 2I at position 1
    assert not params["2.weight"].any() and not params["4.weight"].any()  # unfitted blocks read as the logit lens
    with pytest.raises(LensLabError, match="has 5 layers but model"):
        convert_lens(tmp_path / "tl.pt", "lenslab", tmp_path / "checked", view=view)


def test_a_lens_for_another_model_is_refused_with_model(view, tmp_path):
    tuned(view, bias=False).save(tmp_path / "tuned")
    other = ModelView.from_model(tiny_model("gpt2", seed=1))
    with pytest.raises(LensModelMismatch):
        convert_lens(tmp_path / "tuned", "tuned-lens", tmp_path / "out", view=other)
    assert not (tmp_path / "out").exists()
    convert_lens(tmp_path / "tuned", "tuned-lens", tmp_path / "out", view=other, check="shapes")
    assert json.loads((tmp_path / "out" / CONFIG_FILE).read_text())["unembed_hash"] is None  # not the other's


def test_a_lens_is_not_converted_into_its_own_layout(view, tmp_path):
    tuned(view, bias=False).save(tmp_path / "tuned")
    with pytest.raises(LensLabError, match="already in the lenslab layout"):
        convert_lens(tmp_path / "tuned", "lenslab", tmp_path / "copy")


def test_outputs_lenslab_did_not_write_are_left_alone(view, tmp_path):
    tuned(view, bias=False).save(tmp_path / "tuned")
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "README.md").write_text("mine")
    with pytest.raises(LensLabError, match="did not write, so it is left alone"):
        convert_lens(tmp_path / "tuned", "tuned-lens", foreign)
    assert [path.name for path in foreign.iterdir()] == ["README.md"]
    (tmp_path / "other.pt").write_bytes(b"not a lens")
    with pytest.raises(LensLabError, match="left alone"):
        convert_lens(tmp_path / "tuned", "jacobian-lens", tmp_path / "other.pt")
    with pytest.raises(LensLabError, match="not a .pt file"):
        convert_lens(tmp_path / "tuned", "jacobian-lens", tmp_path / "j.safetensors")
    with pytest.raises(LensLabError, match="is a file, but --to tuned-lens writes a folder"):
        convert_lens(tmp_path / "tuned", "tuned-lens", tmp_path / "other.pt")


def test_a_conversion_replaces_its_own_earlier_output_whole(view, tmp_path):
    tuned(view, bias=False).save(tmp_path / "tuned")
    jacobian(view).save(tmp_path / "jfolder")
    out = tmp_path / "out"
    out.mkdir()  # an empty folder may be written
    convert_lens(tmp_path / "tuned", "tuned-lens", out)
    convert_lens(tmp_path / "jfolder", "tuned-lens", out)
    assert_same_lens(load_lens(out, view), jacobian(view), view)
    convert_lens(tmp_path / "jfolder", "jacobian-lens", tmp_path / "j.pt")
    convert_lens(tmp_path / "tuned", "jacobian-lens", tmp_path / "j.pt")  # its own artifact may be replaced
    # A lenslab output from the tuned-lens folder: the old params.pt must not stay beside params.safetensors.
    convert_lens(out, "lenslab", tmp_path / "ll")
    convert_lens(tmp_path / "j.pt", "lenslab", tmp_path / "ll")
    assert PARAMS_FILE in {path.name for path in (tmp_path / "ll").iterdir()}
    assert not list(tmp_path.glob(".*"))  # no staging or previous folder left behind


def test_cli_converts_and_refuses_with_one_sentence(view, tmp_path, capsys):
    jacobian(view).save(tmp_path / "jfolder")
    out = tmp_path / "j.pt"
    assert main(["convert", "--lens", str(tmp_path / "jfolder"), "--to", "jacobian-lens", "--output", str(out)]) == 0
    assert "Nothing was left out" in capsys.readouterr().out
    assert main(["convert", "--lens", str(tmp_path / "missing"), "--to", "tuned-lens", "-o", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert "No lens found at" in error and error.count("\n") == 1


@pytest.mark.slow  # a fresh interpreter imports torch, transformers and tuned-lens: about 10 s on 2 cores
@pytest.mark.skipif(not TUNED_LENS_PYTHON.is_file(), reason=f"no Python with tuned-lens at {TUNED_LENS_PYTHON}")
def test_tuned_lens_package_loads_the_export(view, tmp_path):
    """tuned-lens's own `TunedLens.from_model_and_pretrained` reads the export and transforms as lenslab does."""
    source = jacobian(view)
    source.save(tmp_path / "jfolder")
    view.model.save_pretrained(tmp_path / "model")
    convert_lens(tmp_path / "jfolder", "tuned-lens", tmp_path / "tl", view=view)
    h = residuals(view)
    torch.save(h, tmp_path / "h.pt")
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        from tuned_lens.nn.lenses import TunedLens
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r})
        lens = TunedLens.from_model_and_pretrained(model, {str(tmp_path / "tl")!r})
        h = torch.load({str(tmp_path / "h.pt")!r})
        torch.save([lens.transform_hidden(h, p) for p in range(len(lens))], {str(tmp_path / "out.pt")!r})
    """)
    result = subprocess.run([str(TUNED_LENS_PYTHON), "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    # tuned-lens logs these for an unembedding hash other than the model's, or a config key it does not know.
    assert "hash does not match" not in result.stderr and "Ignoring config key" not in result.stderr
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert len(out) == view.num_layers
    for position, transformed in enumerate(out):
        torch.testing.assert_close(transformed, source.transform(h, position), rtol=1e-5, atol=1e-5)


def test_cli_with_model_records_its_fingerprint_and_refuses_another(tiny_lm, tmp_path):
    view = ModelView.from_model(tiny_lm.model)
    d, blocks = view.d_model, range(view.num_layers - 1)
    save_jacobian_artifact(JacobianArtifact({block: torch.eye(d) for block in blocks}, 2, d, {}), tmp_path / "j.pt")
    out = tmp_path / "out"
    command = ["convert", "--lens", str(tmp_path / "j.pt"), "--to", "lenslab", "-o", str(out)]
    assert main([*command, "--model", str(tiny_lm.directory)]) == 0
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["unembed_fingerprint"] is not None and config["base_model"] == str(tiny_lm.directory)
    assert load_lens(out, view).prompts == 2  # checked by its fingerprint: no warning that it cannot be
    tuned(ModelView.from_model(tiny_model("gpt2")), bias=False).save(tmp_path / "other")
    other = ["convert", "--lens", str(tmp_path / "other"), "--to", "tuned-lens", "-o", str(tmp_path / "x")]
    assert main([*other, "--model", str(tiny_lm.directory)]) == 2


def test_any_kind_on_translators_converts_as_one_keeping_its_kind(view, tmp_path):
    """A lens kind with TunedLens's translators (the linear lens) converts without the converter knowing it."""
    lens = tuned(view, bias=True)
    config = LensConfig(kind="linear", d_model=view.d_model, num_hidden_layers=view.num_layers, bias=True)
    write_lens(tmp_path / "linear", config, lens.state_dict())
    convert_lens(tmp_path / "linear", "tuned-lens", tmp_path / "tl")
    convert_lens(tmp_path / "tl", "lenslab", tmp_path / "back")
    back_config, tensors = read_lens(tmp_path / "back")
    assert back_config.kind == "tuned"  # the tuned-lens layout records no kind: every lens in it is a tuned lens
    for name, tensor in lens.state_dict().items():
        torch.testing.assert_close(tensors[name], tensor)
    with pytest.raises(LensLabError, match="linear lens has biases"):
        convert_lens(tmp_path / "linear", "jacobian-lens", tmp_path / "j.pt")
