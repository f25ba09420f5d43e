"""Lens files: round trips, the tuned-lens layout, and every way a lens file can be wrong."""

import json
import os
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from lenslab import TunedLens
from lenslab.adapter import ModelView
from lenslab.artifacts import CONFIG_FILE, PARAMS_FILE, read_lens
from lenslab.errors import LensLabError


@pytest.fixture(scope="module")
def view():
    return ModelView.from_model(tiny_model("gpt2", seed=0))


def trained_like_lens(view, seed=0, bias=True):
    """A tuned lens with random (non-zero) translators, standing in for a trained one."""
    lens = TunedLens.from_model(view, bias=bias)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in lens.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return lens


def sample_residuals(view, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, view.vocab_size, (2, 6), generator=generator)
    with torch.no_grad():
        return view.capture(input_ids).hidden


def assert_same_outputs(lens_a, lens_b, view):
    with torch.no_grad():
        for position, h in enumerate(sample_residuals(view)):
            assert torch.equal(lens_a(h, position), lens_b(h, position))


@pytest.mark.parametrize("bias", [True, False])
def test_save_load_round_trip_is_exact(tmp_path, view, bias):
    lens = trained_like_lens(view, bias=bias)
    lens.save(tmp_path / "lens", recipe="test")
    loaded = TunedLens.load(tmp_path / "lens", view)
    for name, tensor in lens.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    assert loaded.bias is bias and loaded.metadata == {"recipe": "test"}
    assert_same_outputs(lens, loaded, view)
    config = json.loads((tmp_path / "lens" / CONFIG_FILE).read_text())
    assert config["d_model"] == view.d_model and config["num_hidden_layers"] == view.num_layers
    assert config["format_version"] == 1 and config["unembed_fingerprint"]["shape"] == [view.vocab_size, view.d_model]


def test_a_loaded_lens_saved_elsewhere_keeps_its_metadata(tmp_path, view):
    """Copying a lens with load + save keeps its training record (the run's fingerprint, the held-out span, ...),
    which `lenslab eval` needs to refuse text the lens was trained on; metadata given to save adds to it."""
    lens = trained_like_lens(view)
    lens.metadata = {"training": {"config": {"steps": 3}}, "data": {"heldout_tokens": 128, "seq_len": 16}}
    lens.save(tmp_path / "trained")
    loaded = TunedLens.load(tmp_path / "trained", view)
    loaded.save(tmp_path / "copy", note="copied")
    copied = TunedLens.load(tmp_path / "copy", view)
    assert copied.metadata == lens.metadata | {"note": "copied"}
    assert loaded.metadata == lens.metadata  # what save was given is not kept by the lens itself
    first, second = (json.loads((tmp_path / name / CONFIG_FILE).read_text()) for name in ("trained", "copy"))
    assert second["unembed_fingerprint"] == first["unembed_fingerprint"]


def write_tuned_lens_layout(directory: Path, lens, view):
    """A lens as the `tuned-lens` package saves it: config.json + a torch.save'd params.pt."""
    directory.mkdir()
    config = {
        "base_model_name_or_path": "tiny-gpt2",
        "d_model": view.d_model,
        "num_hidden_layers": view.num_layers,
        "bias": True,
        "base_model_revision": None,
        "unembed_hash": "0123abcd",
        "lens_type": "linear_tuned_lens",
    }
    (directory / "config.json").write_text(json.dumps(config))
    torch.save(lens.translators.state_dict(), directory / "params.pt")


def test_tuned_lens_package_layout_loads_with_same_outputs(tmp_path, view):
    lens = trained_like_lens(view)
    write_tuned_lens_layout(tmp_path / "published", lens, view)
    loaded = TunedLens.load(tmp_path / "published", view)
    assert_same_outputs(lens, loaded, view)


class RunsCode:
    """Unpickling this would call os.system: exactly what a lens file must never be allowed to do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path, view):
    lens = trained_like_lens(view)
    write_tuned_lens_layout(tmp_path / "evil", lens, view)
    marker = tmp_path / "pwned"
    state = dict(lens.translators.state_dict())
    state["payload"] = RunsCode(marker)
    torch.save(state, tmp_path / "evil" / "params.pt")
    with pytest.raises(LensLabError, match="Refused to load .*would run code"):
        TunedLens.load(tmp_path / "evil", view)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupted_safetensors_is_one_clear_error(tmp_path, view, damage):
    trained_like_lens(view).save(tmp_path / "lens")
    params = tmp_path / "lens" / PARAMS_FILE
    data = params.read_bytes()
    params.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    with pytest.raises(LensLabError, match="truncated, corrupted or not the file written with"):
        TunedLens.load(tmp_path / "lens", view)


def test_truncated_params_pt_is_one_clear_error(tmp_path, view):
    write_tuned_lens_layout(tmp_path / "published", trained_like_lens(view), view)
    params = tmp_path / "published" / "params.pt"
    params.write_bytes(params.read_bytes()[:100])
    with pytest.raises(LensLabError, match="truncated or corrupted"):
        TunedLens.load(tmp_path / "published", view)


def test_lens_for_another_model_is_refused_unless_overridden(tmp_path, view):
    lens = trained_like_lens(view)
    lens.save(tmp_path / "lens")
    other = ModelView.from_model(tiny_model("gpt2", seed=1))
    with pytest.raises(LensLabError, match="unembedding differs.*check='shapes'"):
        TunedLens.load(tmp_path / "lens", other)
    relaxed = TunedLens.load(tmp_path / "lens", other, check="shapes")
    assert torch.equal(relaxed.translators[0].weight, lens.translators[0].weight)


def test_same_model_in_bfloat16_still_matches_fingerprint(tmp_path, view):
    trained_like_lens(view).save(tmp_path / "lens")
    bf16_view = ModelView.from_model(tiny_model("gpt2", seed=0).to(torch.bfloat16))
    TunedLens.load(tmp_path / "lens", bf16_view)


def test_hidden_size_and_layer_count_mismatch_are_refused(tmp_path, view):
    trained_like_lens(view).save(tmp_path / "lens")
    llama = ModelView.from_model(tiny_model("llama"))
    with pytest.raises(LensLabError, match="Hidden size mismatch|layers but model"):
        TunedLens.load(tmp_path / "lens", llama, check="shapes")


def test_mismatched_tensor_shapes_in_file_are_refused(tmp_path, view):
    lens = trained_like_lens(view)
    write_tuned_lens_layout(tmp_path / "published", lens, view)
    state = lens.translators.state_dict()
    state["0.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "published" / "params.pt")
    with pytest.raises(LensLabError, match="Hidden size mismatch in .*0.weight"):
        TunedLens.load(tmp_path / "published", view)


def test_missing_and_invalid_files_are_clear_errors(tmp_path, view):
    with pytest.raises(LensLabError, match="config.json is missing"):
        TunedLens.load(tmp_path / "nowhere", view)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(LensLabError, match="not valid JSON"):
        read_lens(tmp_path / "broken")


def test_failed_write_keeps_the_previous_lens(tmp_path, view, monkeypatch):
    first = trained_like_lens(view, seed=0)
    first.save(tmp_path / "lens")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr("lenslab.artifacts.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        trained_like_lens(view, seed=1).save(tmp_path / "lens")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == [CONFIG_FILE, PARAMS_FILE]
    assert_same_outputs(first, TunedLens.load(tmp_path / "lens", view), view)


def test_nan_in_lens_file_is_refused(tmp_path, view):
    lens = trained_like_lens(view)
    with torch.no_grad():
        lens.translators[0].weight[0, 0] = float("nan")
    lens.save(tmp_path / "lens")
    with pytest.raises(LensLabError, match="NaN"):
        TunedLens.load(tmp_path / "lens", view)


def test_unknown_config_keys_are_dropped_with_a_warning(tmp_path, view, caplog):
    trained_like_lens(view).save(tmp_path / "lens")
    config_path = tmp_path / "lens" / CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["from_the_future"] = 1
    config_path.write_text(json.dumps(config))
    TunedLens.load(tmp_path / "lens", view)
    assert "from_the_future" in caplog.text


def test_written_files_get_ordinary_permissions(tmp_path, view):
    trained_like_lens(view).save(tmp_path / "lens")
    umask = os.umask(0)
    os.umask(umask)
    for name in (CONFIG_FILE, PARAMS_FILE):
        assert (tmp_path / "lens" / name).stat().st_mode & 0o777 == 0o666 & ~umask
