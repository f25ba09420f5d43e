"""The figures of `lenslab eval`, `transfer`, `depth` and `cbe`: one colour per lens kind, readable names, scales."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib import colors

from lenslab.applications.depth import DepthResult
from lenslab.applications.transfer import BASE_TUNED, OWN_TUNED
from lenslab.causal.alignment import Alignment
from lenslab.causal.fidelity import Fidelity
from lenslab.evaluate import EvalResult, LensMetrics, TransferMatrix
from lenslab.plots.causal import fidelity_figure
from lenslab.plots.curves import curves_figure, transfer_figure
from lenslab.plots.depth import depth_figure, standard_errors
from lenslab.plots.palette import KIND_COLORS, lens_label, lens_styles, short_model_name

LAYERS = ["embeddings", "layer 1", "layer 2", "layer 3"]


def metrics(scale: float) -> LensMetrics:
    kl = [scale * 10.0**-p for p in range(3)] + [0.0]  # falls by decades; 0 at the output
    return LensMetrics(ce=[3.0, 2.5, 2.2, 2.0], perplexity=[20.0, 12.0, 9.0, 7.4], kl=kl, entropy=[4.0, 3.0, 2.5, 2.1],
                       top1_agreement=[0.1, 0.5, 0.8, 1.0], bias_kl=[0.1, 0.05, 0.01, 0.0])  # fmt: skip


def result(names: list[str], model: str = "/models/austen-gpt2-6l") -> EvalResult:
    """Lens "logit" is the logit lens, every other a tuned lens."""
    return EvalResult(model=model, tokens=1000, nats_to_bits_per_byte=None, layers=LAYERS, final_ce=2.0,
                      final_entropy=2.1, lenses={name: metrics(1.0 + i) for i, name in enumerate(names)},
                      kinds={name: "logit" if name == "logit" else "tuned" for name in names})  # fmt: skip


def line_colors(figure) -> dict[str, str]:
    """Legend label -> line colour, from the first panel."""
    return {line.get_label(): colors.to_hex(line.get_color()) for line in figure.axes[0].get_lines()}


def test_each_lens_kind_keeps_its_colour_in_eval_and_transfer():
    evaluation = line_colors(curves_figure(result(["logit", "tuned"]), units="nats"))
    # `lenslab transfer` lists the transferred lens first; the colours must not follow the order.
    transfer = line_colors(curves_figure(result([BASE_TUNED, "logit", OWN_TUNED]), units="nats"))
    assert evaluation["logit lens"] == transfer["logit lens"] == KIND_COLORS["logit"].lower()
    tuned = KIND_COLORS["tuned"].lower()
    assert evaluation["tuned lens"] == transfer["base model's tuned lens"] == transfer["own tuned lens"] == tuned


def test_two_lenses_of_one_kind_differ_by_line_style_and_label():
    styles = lens_styles({"logit": "logit", "run-a": "tuned", "run-b": "tuned", "j": "jacobian"})
    assert styles["run-a"].color == styles["run-b"].color != styles["logit"].color
    assert styles["run-a"].linestyle != styles["run-b"].linestyle
    assert [styles[n].label for n in ("run-a", "run-b")] == ["tuned lens (run-a)", "tuned lens (run-b)"]
    # The colour follows the lens's recorded kind, not its name.
    assert styles["j"].color == KIND_COLORS["jacobian"] and styles["j"].label == "jacobian lens (j)"
    assert lens_label(BASE_TUNED, "tuned") == "base model's tuned lens"


def test_eval_figure_has_a_log_kl_axis_entropy_and_top1_panels():
    figure = curves_figure(result(["logit", "tuned"]), units="nats")
    titles = [axes.get_title() for axes in figure.axes]
    assert titles == ["cross-entropy, nats per token", "KL(final ‖ lens), nats per token, log scale",
                      "entropy of the prediction, nats per token", "top-1 agreement with the model"]  # fmt: skip
    kl_axes = figure.axes[1]
    assert kl_axes.get_yscale() == "log"
    low, high = kl_axes.get_ylim()
    assert low < 0.01 * 2 and high > 2.0  # every decade from layer 0 to layer 2 is visible
    assert all(") (" not in title for title in titles)
    assert figure._suptitle.get_text() == "austen-gpt2-6l: 1,000 held-out tokens"


def test_transfer_heatmaps_share_one_scale_and_name_the_lenses():
    evaluation = result(["logit", BASE_TUNED, OWN_TUNED])
    evaluation.transfer = {
        BASE_TUNED: TransferMatrix(kl=[[0.5 * (i + j + 1) for j in range(4)] for i in range(4)], ce=[]),
        OWN_TUNED: TransferMatrix(kl=[[0.01 * (i + 1) for j in range(4)] for i in range(4)], ce=[]),
    }
    figure = transfer_figure(evaluation, units="nats")
    images = [image for axes in figure.axes for image in axes.images]
    assert len(images) == 2 and images[0].norm is images[1].norm
    assert (images[0].norm.vmin, images[0].norm.vmax) == pytest.approx((0.01, 3.5))
    assert [axes.get_title() for axes in figure.axes if axes.images] == ["base model's tuned lens", "own tuned lens"]
    assert "austen-gpt2-6l" in figure._suptitle.get_text()


def test_short_model_names():
    assert short_model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert short_model_name("/work/shared/models/austen-gpt2-6l/") == "austen-gpt2-6l"
    assert short_model_name("gpt2") == "gpt2"


def test_depth_loss_axis_starts_at_zero_with_error_bars():
    depths = torch.tensor([[0, 1, 1, 2, 2, 2]])
    losses = torch.tensor([[5.0, 3.0, 4.0, 1.0, 2.0, 3.0]])
    depth = DepthResult(depths=depths, losses=losses, num_layers=3, spearman_depth_loss=-0.9)
    errors = standard_errors(depth)
    assert math.isnan(errors[0]) and math.isnan(errors[3])  # one token, or none: no error bar
    assert errors[1] == pytest.approx(0.5) and errors[2] == pytest.approx(1 / math.sqrt(3))
    figure = depth_figure(depth, model="org/model", lens_kind="logit")
    loss_axes = figure.axes[1]
    assert loss_axes.get_ylim()[0] == 0 and loss_axes.containers  # errorbar container
    assert colors.to_hex(figure.axes[0].patches[0].get_facecolor()) == KIND_COLORS["logit"].lower()
    assert "from 0" in loss_axes.get_ylabel() and figure.axes[0].get_title().startswith("model: ")


def test_fidelity_names_sigma_as_the_table_does_and_explains_the_diagonal():
    fidelities = [Fidelity(layer=layer, lens_influence=[1.0, 0.5, 0.2], model_influence=[0.3, 0.1, 0.05],
                           spearman=1.0) for layer in (0, 2)]  # fmt: skip
    alignments = [Alignment(layer=0, similarity=0.9, tokens=10)]
    figure = fidelity_figure(fidelities, alignments, model="a/b", lens_kind="tuned")
    panels = [axes for axes in figure.axes if axes.get_visible()]
    assert [axes.get_xlabel() for axes in panels] == ["lens σ (nats)"] * 2
    assert [axes.get_ylabel() for axes in panels] == ["model σ (nats)"] * 2
    assert panels[0].get_title() == "layer 0: ρ = 1.00, align 0.90"
    assert "below y = x because" in figure._supxlabel.get_text()
    points = panels[0].collections[0]
    assert colors.to_hex(points.get_facecolor()[0]) == KIND_COLORS["tuned"].lower()
    assert np.allclose(points.get_offsets(), [[1.0, 0.3], [0.5, 0.1], [0.2, 0.05]])
