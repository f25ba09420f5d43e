"""GGUF files as --model: converted once into lenslab's cache, whole or not at all (the real read is in tests/real)."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from lenslab import load_model
from lenslab.errors import LensLabError
from lenslab.gguf import CACHE_ENV, cache_root, dequantised_folder, is_gguf


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, tiny_lm):
    """A file named like a GGUF model whose "conversion" copies the tiny trained LM, counting the conversions."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    path = tmp_path / "models" / "tiny.Q4_0.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF stand-in")
    conversions = []

    def convert(source, dtype, destination, trust_remote_code):
        conversions.append(dtype)
        shutil.copytree(tiny_lm.directory, destination, dirs_exist_ok=True)

    monkeypatch.setattr("lenslab.gguf._convert", convert)
    return path, conversions


def test_a_gguf_model_is_converted_once_and_named_by_its_file(fake_gguf, tmp_path):
    path, conversions = fake_gguf
    first = load_model(str(path), device="cpu")
    second = load_model(str(path), device="cpu")
    assert conversions == [torch.float32]
    assert first.model.config.name_or_path == second.model.config.name_or_path == str(path)
    assert cache_root() == tmp_path / "cache"
    folders = list((tmp_path / "cache" / "gguf").iterdir())
    assert [folder.name.startswith("tiny.Q4_0-") for folder in folders] == [True]
    load_model(str(path), device="cpu", dtype="bfloat16")  # another dtype is another copy
    assert conversions == [torch.float32, torch.bfloat16]


def test_a_changed_file_is_converted_again(fake_gguf):
    path, conversions = fake_gguf
    dequantised_folder(path, torch.float32)
    path.write_bytes(b"GGUF stand-in, re-downloaded with other weights")
    dequantised_folder(path, torch.float32)
    assert len(conversions) == 2


def test_a_failed_conversion_leaves_nothing_behind(fake_gguf, tmp_path, monkeypatch):
    path, _ = fake_gguf

    def crash(source, dtype, destination, trust_remote_code):
        (destination / "config.json").write_text("{")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr("lenslab.gguf._convert", crash)
    with pytest.raises(KeyboardInterrupt):
        dequantised_folder(path, torch.float32)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_without_the_gguf_package_the_error_names_the_extra(fake_gguf, monkeypatch):
    path, _ = fake_gguf
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(LensLabError, match=r"needs the gguf package; install it with pip install 'lenslab\[gguf\]'"):
        load_model(str(path), device="cpu")


def test_a_missing_gguf_file_is_named(tmp_path):
    assert is_gguf("Model.Q8_0.GGUF") and not is_gguf("gpt2")
    with pytest.raises(LensLabError, match="GGUF file .*nowhere.gguf does not exist"):
        load_model(str(tmp_path / "nowhere.gguf"), device="cpu")
