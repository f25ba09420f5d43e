"""The closed-form start's shrinkage toward the identity, chosen by KL on held-out sequences.

- where the identity decodes exactly what the model does and the fit does not, the position keeps the logit lens,
  although the fit's squared error is the lower (why the shrinkage is chosen by KL);
- each position's alpha is the grid point of least held-out KL, against a plain reference (fit on the other
  sequences, KL from `layer_kl_sum`), and the translators are then the fit on all the sequences times it;
- a start of one sequence holds none out, says so and keeps the fit; the sums stay in host memory.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from lenslab.adapter import ModelView
from lenslab.lenses import TunedLens
from lenslab.train.closed_form import SHRINKAGE_GRID, NormalEquations, fit_closed_form, heldout_sequences, solve_ridge
from lenslab.train.distributed import Processes
from lenslab.train.objective import final_target, layer_kl_sum

CPU = torch.device("cpu")


def fitted_lens(view: ModelView, tokens: torch.Tensor, ridge: float, scales: list[float]) -> TunedLens:
    """The plain reference: each translator the ridge fit on `tokens` ([n, seq_len]) times its scale."""
    equations = NormalEquations.zeros(view.num_layers, view.d_model, True)
    lens = TunedLens.from_model(view)
    with torch.no_grad():
        equations.add(view.capture(tokens).hidden, True)
        for layer, (translator, scale) in enumerate(zip(lens.translators, scales, strict=True)):
            solution = solve_ridge(equations, layer, ridge, CPU)
            translator.weight.copy_(scale * solution.weight)
            translator.bias.copy_(scale * solution.bias)
    return lens


@torch.no_grad()
def kl_per_position(view: ModelView, lens: TunedLens, tokens: torch.Tensor) -> torch.Tensor:
    """Mean KL(p_final || p_lens) per token at every lens position 0..L-1: [L]."""
    residuals = view.capture(tokens)
    target = final_target(residuals.logits)
    sums = [layer_kl_sum(lens, residuals.hidden[p], p, target) for p in range(view.num_layers)]
    return torch.stack(sums) / tokens.numel()


def test_a_position_whose_fit_decodes_worse_than_the_identity_keeps_the_logit_lens():
    view = ModelView.from_model(tiny_model("llama"))

    def rescale(module, args, kwargs, output):
        # The last layer returns its input times a factor in (0.5, 2.5) that varies with the token: the final
        # RMSNorm undoes it, so the logit lens at the last position decodes exactly the model's output, while a
        # linear map (which cannot undo a token-dependent scale) can only blur it.
        h = args[0] if args else kwargs["hidden_states"]
        rescaled = h * (1.5 + torch.tanh(7 * h.sum(-1, keepdim=True)))
        return (rescaled, *output[1:]) if isinstance(output, tuple) else rescaled

    view.layers[-1].register_forward_hook(rescale, with_kwargs=True)
    generator = torch.Generator().manual_seed(0)
    tokens, heldout = torch.randint(3, VOCAB, (2, 8, 16), generator=generator)
    lens = TunedLens.from_model(view)
    start = fit_closed_form(view, lens, tokens, 4, 1e-4, Processes())
    last = view.num_layers - 1
    assert start.shrinkage[last] == 0.0
    assert lens.translators[last].weight.abs().max() == 0 and lens.translators[last].bias.abs().max() == 0

    unshrunk = fitted_lens(view, tokens, 1e-4, [1.0] * view.num_layers)
    logit_kl = kl_per_position(view, TunedLens.from_model(view), heldout)[last]
    unshrunk_kl = kl_per_position(view, unshrunk, heldout)[last]
    assert logit_kl < 1e-5 < 1e-4 < unshrunk_kl  # the unshrunk fit would have made this position worse
    # ... although it predicts the last residual far better than the identity does: squared error could not tell.
    with torch.no_grad():
        hidden = view.capture(heldout).hidden
    target = hidden[-1] - hidden[last]
    assert (unshrunk.transform(hidden[last], last) - hidden[-1]).square().sum() < target.square().sum()


def test_each_alpha_is_the_heldout_kl_minimum_and_scales_the_fit_on_every_sequence(tiny_lm):
    view = ModelView.from_model(tiny_lm.model)
    ids = tiny_lm.tokenizer(tiny_lm.train_text_path.read_text()[:20_000])["input_ids"]
    tokens = torch.tensor(ids[: 16 * 32]).view(16, 32)
    assert heldout_sequences(len(tokens)) == 2
    ridge = 1e-4
    lens = TunedLens.from_model(view)
    start = fit_closed_form(view, lens, tokens, 5, ridge, Processes())  # 5: ragged micro-batches

    fitted, heldout = tokens[:14], tokens[14:]
    kl = torch.stack(
        [kl_per_position(view, fitted_lens(view, fitted, ridge, [alpha] * view.num_layers), heldout)
         for alpha in SHRINKAGE_GRID]
    )  # fmt: skip  # [alphas, L]
    assert start.shrinkage == [SHRINKAGE_GRID[i] for i in kl.argmin(0).tolist()]
    assert start.shrinkage != [1.0] * view.num_layers  # a budget this small does shrink some position
    assert start.equations.count.item() == tokens.numel() and start.equations.gram.device == CPU
    expected = fitted_lens(view, tokens, ridge, start.shrinkage)
    for name, tensor in lens.state_dict().items():
        torch.testing.assert_close(tensor, expected.state_dict()[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_start_of_one_sequence_keeps_the_fit_and_says_why(caplog):
    view = ModelView.from_model(tiny_model("gpt2"))
    tokens = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    lens = TunedLens.from_model(view)
    with caplog.at_level("WARNING", logger="lenslab.train.closed_form"):
        start = fit_closed_form(view, lens, tokens, 1, 1e-2, Processes())
    assert start.shrinkage is None
    assert "pass --init-tokens of at least two sequences (32)" in caplog.text
    expected = fitted_lens(view, tokens, 1e-2, [1.0] * view.num_layers)
    for name, tensor in lens.state_dict().items():
        torch.testing.assert_close(tensor, expected.state_dict()[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("sequences, heldout", [(0, 0), (1, 0), (2, 1), (15, 1), (16, 2), (256, 32)])
def test_one_sequence_in_eight_is_held_out(sequences, heldout):
    assert heldout_sequences(sequences) == heldout
