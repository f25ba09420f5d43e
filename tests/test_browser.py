"""The HTML of `lenslab show` drawn by a real browser: headless Chromium runs the page's scripts offline.

Needs Debian's ``chromium`` on PATH (``apt-get install chromium``; ``.ci/run`` installs it). Without it
the test skips locally, but fails under CI (``CI`` set), where the browser check must run.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image

from lenslab.cli import main
from lenslab.lenses import LogitLens, TunedLens
from lenslab.plots.html import page_height
from lenslab.tokens import visible
from lenslab.trajectory import Trajectory, TrajectoryConfig

PROMPT = "Elnu counted one, two, three, four"
BROWSERS = ("chromium", "chromium-browser")


def chromium() -> str:
    """Path of the Chromium binary; skips the test without one, or fails it under CI."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    reason = f"no Chromium on PATH (looked for {', '.join(BROWSERS)}); install it with `apt-get install chromium`"
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"CI is set but the browser test cannot run: {reason}")
    pytest.skip(reason)


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with a fresh profile and no network traffic of its own."""
    command = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def heatmap_cells(dom: str) -> list[list[str]]:
    """Text of the cells of each drawn heatmap, from the DOM after the page's scripts ran.

    Plotly draws a heatmap as ``<g class="hm">`` holding an ``<image>`` (the coloured raster) and one
    ``<g class="heatmap-label"><text>`` per cell, in trace order.
    """
    cells = []
    for heatmap in dom.split('<g class="hm">')[1:]:
        assert heatmap.startswith("<image"), "a heatmap has no raster image: nothing was coloured"
        texts = re.findall(r'<g class="heatmap-label"><text[^>]*>(.*?)</text>', heatmap)
        cells.append([html.unescape(text) for text in texts])
    return cells


ARTIFACTS = Path(__file__).parent / "artifacts"


def test_heatmap_draws_in_headless_chromium(tiny_lm, tmp_path):
    binary = chromium()
    lens = TunedLens.from_model(tiny_lm.model)
    lens_dir = lens.save(tmp_path / "lens")
    page = tmp_path / "show.html"
    assert main(["show", "--model", str(tiny_lm.directory), "--lens", str(lens_dir), "-o", str(page), PROMPT]) == 0

    dom = run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", page.as_uri()).stdout
    assert 'class="main-svg"' in dom, "plotly did not render its SVG"
    cells = heatmap_cells(dom)
    assert len(cells) == 2, "expected the logit and the tuned lens heatmaps"
    logit = Trajectory.from_text(tiny_lm.model, tiny_lm.tokenizer, LogitLens.from_model(tiny_lm.model), PROMPT,
                                 config=TrajectoryConfig(top_k=1))  # fmt: skip
    expected = [visible(logit.token_text[i]) for i in logit.top_k_ids[:, :, 0].flatten().tolist()]
    # An untrained tuned lens is the logit lens, so both heatmaps show the same top-1 tokens.
    for drawn in cells:
        assert sorted(drawn) == sorted(expected)
    assert "✓" in dom, "no correct next-token mark above the columns"

    # The figure follows the window's width; its height is set by the number of panels.
    width, height = 1200, page_height([logit, logit])
    # Kept after the run (git-ignored) so a person can look at what the browser drew.
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "browser-show.png"
    run_chromium(binary, tmp_path / "profile-shot", f"--screenshot={screenshot}", f"--window-size={width},{height}",
                 "--hide-scrollbars", page.as_uri())  # fmt: skip
    print(f"browser screenshot: {screenshot}")
    pixels = image.imread(screenshot)[..., :3]
    colours = np.unique((pixels.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) > 50, "the screenshot is nearly blank"
