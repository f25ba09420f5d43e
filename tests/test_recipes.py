"""The fast recipe's pieces against plain references, and its gain over the paper's recipe on a trained model.

- closed-form start: the ridge solution from summed normal equations equals `torch.linalg.lstsq` on the same
  residuals, and the whitening matrices equal a direct inverse;
- chunked KL: value and gradient equal the plain per-position KL (float32 exactly, bfloat16 within its rounding),
  for heads with a bias, a logit scale, a softcap and `project_out`, over several (ragged) chunks, and follow a logit
  transform the adapter gains as evaluation does;
- whitened SGD: one step equals SGD on the hand-whitened gradient, and its state survives a checkpoint;
- recipes: settings left at None resolve to each recipe's defaults, and the fast recipe reaches a lower held-out
  KL than the paper's at every position for the same number of tokens;
- distributed: two gloo processes train the fast recipe's lens that one process does, up to rounding (on the
  trained model: on a random one the closed-form start is exact to ~1e-7 nats, where losses cannot be compared),
  its closed-form sums and held-out KL averaged over them although only one holds a sequence out.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from tiny_models import VOCAB, tiny_model

from lenslab.adapter import ModelView
from lenslab.architectures import LogitScale
from lenslab.errors import LensLabError
from lenslab.evaluate import evaluate_lenses
from lenslab.lenses import TunedLens
from lenslab.train import TrainConfig, init_distributed, shutdown_distributed, train_lens
from lenslab.train import chunked_kl as chunked_kl_module
from lenslab.train import native_kl as native_kl_module
from lenslab.train.chunked_kl import chunked_kl
from lenslab.train.closed_form import NormalEquations, input_inverses, solve_ridge
from lenslab.train.config import RECIPE_DEFAULTS
from lenslab.train.native_kl import native_kl
from lenslab.train.objective import backward_by_layer, backward_chunked, final_target, layer_kl_sum
from lenslab.train.recipes import RECIPES, FastRecipe, PaperRecipe
from lenslab.train.whitened_sgd import WhitenedSGD


def captured(family: str, shape=(3, 10), seed: int = 1):
    view = ModelView.from_model(tiny_model(family))
    input_ids = torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return view, view.capture(input_ids)


def perturbed_lens(view: ModelView, bias: bool = True) -> TunedLens:
    """A lens away from the identity, so that every gradient is informative."""
    lens = TunedLens.from_model(view, bias=bias)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in lens.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return lens


# ---------------------------------------------------------------------------------------------------
# Closed-form start
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_ridge_solution_equals_lstsq_on_the_same_residuals(bias):
    view, residuals = captured("llama", shape=(6, 12))
    hidden = residuals.hidden
    equations = NormalEquations.zeros(view.num_layers, view.d_model, bias)
    for half in (slice(0, 3), slice(3, 6)):  # summed over two micro-batches
        equations.add([h[half] for h in hidden], bias)
    ridge = 1e-2
    cpu = torch.device("cpu")

    last = hidden[-1].flatten(0, 1).double()
    for layer in range(view.num_layers):
        x = hidden[layer].flatten(0, 1).double()
        design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) if bias else x
        # Ridge as ordinary least squares on rows of sqrt(lambda) I appended (the bias column not penalised).
        lam = ridge * (x.T @ x).diagonal().mean()
        penalty = torch.zeros(view.d_model, design.shape[1], dtype=x.dtype)
        penalty[:, : view.d_model] = lam.sqrt() * torch.eye(view.d_model, dtype=x.dtype)
        stacked = torch.cat([design, penalty])
        targets = torch.cat([last - x, torch.zeros(view.d_model, view.d_model, dtype=x.dtype)])
        expected = torch.linalg.lstsq(stacked, targets).solution  # [k, d_model]
        solution = solve_ridge(equations, layer, ridge, cpu)
        torch.testing.assert_close(solution.weight, expected[: view.d_model].T, rtol=1e-7, atol=1e-9)
        if bias:
            torch.testing.assert_close(solution.bias, expected[-1], rtol=1e-7, atol=1e-9)
        else:
            assert solution.bias is None

    inverses = list(input_inverses(equations, ridge, [cpu] * view.num_layers))
    count = hidden[0].shape[0] * hidden[0].shape[1]
    assert equations.count.item() == count
    gram = equations.gram[0].clone()
    block = gram[: view.d_model, : view.d_model]
    block += ridge * block.diagonal().mean() * torch.eye(view.d_model, dtype=gram.dtype)
    torch.testing.assert_close(inverses[0] @ (gram / count), torch.eye(len(gram), dtype=gram.dtype), atol=1e-8, rtol=0)


def test_closed_form_start_sets_the_translators_and_needs_enough_tokens():
    view = ModelView.from_model(tiny_model("gpt2"))
    tokens = torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    config = TrainConfig(steps=1, tokens_per_step=16, batch_size=4, init_tokens=128, lr=1e-12)  # a negligible step
    result = train_lens(view, tokens, config, progress=False)
    assert result.init_tokens == 128 and result.lens.metadata["init_tokens"] == 128
    shrinkage = result.init_shrinkage
    assert result.lens.metadata["init_shrinkage"] == shrinkage and len(shrinkage) == view.num_layers

    equations = NormalEquations.zeros(view.num_layers, view.d_model, True)
    with torch.no_grad():
        equations.add(view.capture(tokens).hidden, True)  # the init read all 8 sequences, in another order
    for layer, translator in enumerate(result.lens.translators):
        solution = solve_ridge(equations, layer, config.ridge, torch.device("cpu"))
        torch.testing.assert_close(translator.weight, shrinkage[layer] * solution.weight.float(), atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(translator.bias, shrinkage[layer] * solution.bias.float(), atol=1e-4, rtol=1e-3)

    with pytest.raises(LensLabError, match="singular.*--init-tokens or --ridge"):
        train_lens(view, tokens[:1], TrainConfig(steps=1, tokens_per_step=16, ridge=0.0), progress=False)


# ---------------------------------------------------------------------------------------------------
# Chunked KL
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(params=["native", "torch"])
def kl_kernel(request, monkeypatch):
    """Run the chunked KL's element-wise part in the compiled kernel, or in PyTorch operations."""
    if request.param == "native":
        if native_kl() is None:
            pytest.skip("the KL kernel needs GCC on Linux (see lenslab.train.native_kl)")
    else:
        monkeypatch.setattr(chunked_kl_module, "native_kl", lambda: None)
    return request.param


def test_the_kl_kernel_builds_wherever_gcc_runs_on_linux():
    if platform.system() == "Linux" and shutil.which("gcc"):
        assert native_kl() is not None


def test_a_kernel_that_fails_to_build_leaves_the_pytorch_path(monkeypatch, caplog):
    monkeypatch.setattr(native_kl_module.platform, "system", lambda: "Linux")
    monkeypatch.setattr(native_kl_module.shutil, "which", lambda name: "/bin/false")  # a "compiler" that fails
    with caplog.at_level("WARNING", logger="lenslab.train.native_kl"):
        assert native_kl.__wrapped__() is None  # uncached: a fresh build attempt
    assert "Could not build the KL kernel" in caplog.text


@pytest.mark.parametrize("kl_kernel", ["native", "torch"], indirect=True)
def test_chunked_kl_of_no_tokens_is_zero(kl_kernel):
    view, _ = captured("gpt2")
    z_lens = torch.zeros(view.num_layers, 0, view.d_model, requires_grad=True)
    sums = chunked_kl(view, z_lens, torch.zeros(0, view.d_model), low_precision=True)
    assert sums.tolist() == [0.0] * view.num_layers
    sums.sum().backward()
    assert z_lens.grad.shape == z_lens.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kl_kernel_equals_its_pytorch_twin_on_several_threads(dtype):
    kernel = native_kl()
    if kernel is None:
        pytest.skip("the KL kernel needs GCC on Linux (see lenslab.train.native_kl)")
    generator = torch.Generator().manual_seed(0)
    positions, tokens, vocab, scale = 3, 5, 1000, 1.7
    gap = (4 * torch.randn(positions * tokens, vocab, generator=generator)).to(dtype)
    log_p = (3 * torch.randn(tokens, vocab, generator=generator)).log_softmax(-1)
    grad, kl = torch.empty_like(gap), torch.empty(positions * tokens)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # 15 rows in 3 slices, each row r reading the target of token r % 5
    try:
        kernel(gap, log_p, log_p.exp(), grad, kl, scale)
    finally:
        torch.set_num_threads(threads)
    expected_grad = scale * gap.float().view(positions, tokens, vocab)
    expected_kl = chunked_kl_module._kl_and_logit_grad(expected_grad, log_p, log_p.exp())
    expected_grad.mul_(scale)
    torch.testing.assert_close(kl, expected_kl.flatten(), rtol=1e-5, atol=1e-5)
    tolerance = {"rtol": 1e-2, "atol": 1e-4} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(grad.float(), expected_grad.view_as(gap), **tolerance)
    # The library is linked without -ffast-math, whose start-up code would flush this process's denormals to zero.
    assert torch.tensor([1e-40]).mul(3.0).item() > 0


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2", "cohere", "opt", "granite"])
@pytest.mark.parametrize("low_precision", [False, True])
def test_chunked_kl_equals_the_plain_kl(family, low_precision, kl_kernel, monkeypatch):
    """gpt2 (unembedding without bias), gemma2 (softcap), cohere and granite (logit scale), opt (project_out)."""
    # 4 positions x 2 tokens: 15 ragged chunks of 30 tokens
    monkeypatch.setitem(chunked_kl_module.CHUNK_ELEMENTS, "cpu", 2 * 4 * VOCAB)
    view, residuals = captured(family)
    lens = perturbed_lens(view)
    n_layers = view.num_layers
    log_p = residuals.logits.log_softmax(-1)
    weights = torch.linspace(0.5, 2.0, n_layers)  # a different weight per position checks the backward's routing
    reference = torch.stack(
        [
            F.kl_div(lens(residuals.hidden[layer], layer).log_softmax(-1), log_p, log_target=True, reduction="sum")
            for layer in range(n_layers)
        ]
    )
    (reference * weights).sum().backward()
    expected = {name: param.grad.clone() for name, param in lens.named_parameters()}
    lens.zero_grad()

    z_final = view.head_input(residuals.hidden[n_layers]).flatten(0, 1)
    z_lens = torch.stack(
        [view.head_input(lens.transform(residuals.hidden[layer], layer)) for layer in range(n_layers)]
    ).flatten(1, 2)
    sums = chunked_kl(view, z_lens, z_final, low_precision=low_precision)
    (sums * weights).sum().backward()
    # bfloat16 rounds the (lens - target) logits to about 3 significant digits, so to ~1e-3 of each term.
    rtol, atol = (3e-3, 1e-3) if low_precision else (1e-4, 1e-5)
    torch.testing.assert_close(sums, reference.detach(), rtol=rtol, atol=atol)
    for name, param in lens.named_parameters():
        scale = expected[name].abs().max()
        torch.testing.assert_close(param.grad / scale, expected[name] / scale, rtol=0, atol=10 * rtol, msg=name)


@pytest.mark.parametrize("low_precision", [False, True])
def test_chunked_kl_is_exact_where_the_lens_rules_out_the_targets_top_token(low_precision, kl_kernel):
    """A lens that gives the target's top token a probability below float32's range: the KL stays finite and exact."""
    view, residuals = captured("gpt2")
    with torch.no_grad():
        z_final = view.head_input(residuals.hidden[view.num_layers]).flatten(0, 1)
        top = view.unembed(z_final).argmax(-1)  # [tokens]
        # Position 0: the target minus a long step along the top token's unembedding row, which drives that
        # token's lens logit far below the others; position 1: the target itself (KL 0).
        push = view.unembed.weight[top] / view.unembed.weight[top].norm(dim=-1, keepdim=True) ** 2
        z_lens = torch.stack([z_final - 1e3 * push, z_final])
        log_p = view.unembed(z_final).log_softmax(-1)
        reference = torch.stack(
            [F.kl_div(view.unembed(z).log_softmax(-1), log_p, log_target=True, reduction="sum") for z in z_lens]
        )
        lowest = view.unembed(z_lens[0]).log_softmax(-1).gather(-1, top[:, None]).max()
    assert lowest < -100  # the top token's lens probability is below float32's range (e^-87) at every token
    z_lens.requires_grad_()
    sums = chunked_kl(view, z_lens, z_final, low_precision=low_precision)
    assert torch.isfinite(sums).all()
    torch.testing.assert_close(sums, reference, rtol=3e-3 if low_precision else 1e-5, atol=1e-4)
    sums.sum().backward()
    assert torch.isfinite(z_lens.grad).all()


def _vocabulary_tilt(logits: torch.Tensor) -> torch.Tensor:
    """A logit transform no model has: non-linear, and different for every token of the vocabulary."""
    tilt = torch.linspace(-1.0, 1.0, logits.shape[-1], dtype=logits.dtype, device=logits.device)
    return logits + tilt * torch.tanh(logits)


@pytest.mark.parametrize(
    ("family", "added"),
    [("cohere", LogitScale(3.0)), ("gpt2", _vocabulary_tilt), ("gemma2", _vocabulary_tilt)],
    ids=["scale-after-scale", "tilt", "tilt-after-softcap"],
)
def test_a_logit_transform_added_to_the_adapter_changes_evaluation_and_training_alike(
    family, added, kl_kernel, monkeypatch
):
    """Training reads the head through the adapter, so a transform the adapter gains (here set on the view) changes
    `ModelView.decode`, hence evaluation, and the chunked KL alike: it still equals the KL of whole decodes.

    Another scale keeps the head a multiplication (the kernel's path); the tilt makes it one the chunked KL must
    differentiate through by autograd."""
    monkeypatch.setitem(chunked_kl_module.CHUNK_ELEMENTS, "cpu", 2 * 4 * VOCAB)  # several chunks, one ragged
    view, _ = captured(family)
    tokens = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = view.capture(tokens).hidden
    lens, n_layers = perturbed_lens(view), view.num_layers
    with torch.no_grad():
        before = view.decode(hidden[n_layers])
        evaluated_before = evaluate_lenses(view, {"tuned": lens}, tokens).lenses["tuned"].kl
    view.logit_transforms = (*view.logit_transforms, added)
    with torch.no_grad():
        final_logits = view.decode(hidden[n_layers])
        evaluated = evaluate_lenses(view, {"tuned": lens}, tokens).lenses["tuned"].kl
    torch.testing.assert_close(final_logits, added(before), rtol=0, atol=0)

    log_p = final_logits.log_softmax(-1)
    kl = [  # [batch, seq] at each position
        F.kl_div(lens(hidden[layer], layer).log_softmax(-1), log_p, log_target=True, reduction="none").sum(-1)
        for layer in range(n_layers)
    ]
    # Evaluation scores every position but the last of each sequence.
    expected_means = torch.stack([position_kl[:, :-1].mean() for position_kl in kl]).detach()
    torch.testing.assert_close(torch.tensor(evaluated[:n_layers]), expected_means, rtol=1e-4, atol=1e-6)
    assert max(abs(after - was) for after, was in zip(evaluated, evaluated_before)) > 1e-3

    reference = torch.stack([position_kl.sum() for position_kl in kl])
    weights = torch.linspace(0.5, 2.0, n_layers)
    (reference * weights).sum().backward()
    expected = {name: param.grad.clone() for name, param in lens.named_parameters()}
    lens.zero_grad()
    z_final = view.head_input(hidden[n_layers]).flatten(0, 1)
    z_lens = torch.stack([view.head_input(lens.transform(hidden[layer], layer)) for layer in range(n_layers)])
    sums = chunked_kl(view, z_lens.flatten(1, 2), z_final)
    (sums * weights).sum().backward()
    torch.testing.assert_close(sums, reference.detach(), rtol=1e-4, atol=1e-5)
    for name, param in lens.named_parameters():
        scale = expected[name].abs().max()
        torch.testing.assert_close(param.grad / scale, expected[name] / scale, rtol=0, atol=1e-3, msg=name)


def test_every_recipe_has_defaults_under_its_name():
    assert set(RECIPES) == set(RECIPE_DEFAULTS)
    assert all(name == recipe.name for name, recipe in RECIPES.items())


def test_chunked_backward_equals_the_layer_by_layer_backward():
    view, residuals = captured("gpt2")
    lens = perturbed_lens(view)
    n_tokens = residuals.hidden[0].shape[0] * residuals.hidden[0].shape[1]
    plain = backward_by_layer(
        lens, residuals.hidden, final_target(residuals.logits), 1 / n_tokens, torch.autocast("cpu", enabled=False)
    )
    expected = {name: param.grad.clone() for name, param in lens.named_parameters()}
    lens.zero_grad()
    fused = backward_chunked(lens, residuals.hidden, 1 / n_tokens, low_precision=False)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)
    for name, param in lens.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------------
# Whitened SGD
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_whitened_sgd_steps_on_the_whitened_gradient(bias):
    view = ModelView.from_model(tiny_model("gpt2"))
    lens, reference = perturbed_lens(view, bias), perturbed_lens(view, bias)
    k = view.d_model + int(bias)
    generator = torch.Generator().manual_seed(5)
    factors = torch.randn(view.num_layers, k, k, generator=generator)
    inverses = factors @ factors.transpose(1, 2) / k + torch.eye(k)  # symmetric positive definite
    gradients = [torch.randn(p.shape, generator=generator) for p in lens.parameters()]

    optimizer = WhitenedSGD(list(lens.parameters()), lr=0.1, momentum=0.9, weight_decay=0.0)
    optimizer.set_preconditioners(inverses)
    plain = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for param, grad in zip(lens.parameters(), gradients, strict=True):
        param.grad = grad.clone()
    for layer, translator in enumerate(reference.translators):
        index = layer * (1 + int(bias))
        grad = torch.cat([gradients[index], gradients[index + 1][:, None]], 1) if bias else gradients[index]
        whitened = grad @ inverses[layer]
        translator.weight.grad = whitened[:, : view.d_model].clone()
        if bias:
            translator.bias.grad = whitened[:, -1].clone()
    optimizer.step()
    plain.step()
    for (name, param), expected in zip(lens.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param, expected, msg=name)

    restored = WhitenedSGD(list(reference.parameters()), lr=0.1, momentum=0.9, weight_decay=0.0)
    restored.load_state_dict(optimizer.state_dict())  # what a resumed run does: the preconditioners come back
    torch.testing.assert_close(restored.state[reference.translators[1].weight]["input_inverse"], inverses[1])


# ---------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------


def test_settings_left_at_none_take_each_recipes_defaults():
    fast, paper = TrainConfig(), TrainConfig(recipe="paper")
    assert (fast.effective_steps, fast.effective_optimizer, fast.effective_lr) == (60, "whitened", 30.0)
    assert (fast.effective_weight_decay, fast.effective_init_tokens, fast.effective_warmup_steps) == (0.0, 2**16, 0)
    assert (paper.effective_steps, paper.effective_optimizer, paper.effective_lr) == (250, "sgd", 1.0)
    assert (paper.effective_weight_decay, paper.effective_init_tokens) == (1e-3, 0)
    assert TrainConfig(optimizer="adam", steps=100).effective_warmup_steps == 10
    assert fast.fingerprint()["steps"] == 60 and paper.fingerprint()["init_tokens"] == 0
    # A recipe reads a config with its own defaults, whichever recipe the config names.
    assert isinstance(PaperRecipe(fast).build_optimizer([torch.nn.Parameter(torch.zeros(2))]), torch.optim.SGD)
    assert FastRecipe(paper).config.effective_optimizer == "whitened"
    assert RECIPE_DEFAULTS["fast"].steps * 4 <= RECIPE_DEFAULTS["paper"].steps  # at most a quarter of the tokens
    with pytest.raises(LensLabError, match="whitened needs the closed-form start.*--init-tokens above 0"):
        TrainConfig(init_tokens=0)
    with pytest.raises(LensLabError, match="--ridge is -1"):
        TrainConfig(ridge=-1.0)


def test_fast_recipe_beats_the_paper_recipe_at_equal_tokens(tiny_lm):
    view = ModelView.from_model(tiny_lm.model)
    ids = tiny_lm.tokenizer(tiny_lm.train_text_path.read_text()[:60_000])["input_ids"]
    train = torch.tensor(ids[: len(ids) // 32 * 32]).view(-1, 32)
    ids = tiny_lm.tokenizer(tiny_lm.heldout_text_path.read_text()[:20_000])["input_ids"]
    heldout = torch.tensor(ids[: len(ids) // 32 * 32]).view(-1, 32)[:64]
    # 8192 tokens each: 16 steps of 512, or a 2048-token closed-form start and 12 steps of 512.
    paper = TrainConfig(recipe="paper", steps=16, tokens_per_step=512, batch_size=16)
    fast = TrainConfig(recipe="fast", steps=12, tokens_per_step=512, batch_size=16, init_tokens=2048)

    @torch.no_grad()
    def heldout_kl(lens: TunedLens) -> torch.Tensor:
        residuals = view.capture(heldout)
        target = final_target(residuals.logits)
        return torch.stack([layer_kl_sum(lens, residuals.hidden[p], p, target) for p in range(view.num_layers)])

    paper_result = train_lens(view, train, paper, progress=False)
    fast_result = train_lens(view, train, fast, progress=False)
    assert fast_result.init_tokens + fast_result.history[-1].tokens == paper_result.history[-1].tokens == 8192
    paper_kl, fast_kl = heldout_kl(paper_result.lens), heldout_kl(fast_result.lens)
    assert (fast_kl < paper_kl).all(), (fast_kl, paper_kl)
    assert fast_kl.mean() < 0.5 * paper_kl.mean()


# ---------------------------------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------------------------------

# A closed-form start of 9 sequences: 8 fitted, 4 per process, and 1 held out, by one process only.
DDP_CONFIG = TrainConfig(recipe="fast", steps=3, tokens_per_step=8 * 32, batch_size=2, init_tokens=9 * 32)


def ddp_tokens(model_dir: Path) -> torch.Tensor:
    from support.tiny_lm import load_tiny_lm

    tiny = load_tiny_lm(model_dir)
    ids = tiny.tokenizer(tiny.train_text_path.read_text()[:20_000])["input_ids"]
    return torch.tensor(ids[: 32 * 32]).view(32, 32)


def _ddp_worker(rank: int, world_size: int, port: int, model_dir: Path, root: Path) -> None:
    """One torchrun-like process: the environment torchrun would set, then the library."""
    from support.tiny_lm import load_tiny_lm

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )  # fmt: skip
    torch.set_num_threads(1)
    init_distributed("cpu")
    try:
        view = ModelView.from_model(load_tiny_lm(model_dir).model)
        result = train_lens(view, ddp_tokens(model_dir), DDP_CONFIG, progress=False)
        torch.save(
            {"lens": result.lens.state_dict(), "losses": [r.loss for r in result.history],
             "shrinkage": result.init_shrinkage},
            root / f"{rank}.pt",
        )  # fmt: skip
    finally:
        shutdown_distributed()


@pytest.mark.slow  # two fresh interpreters import torch and transformers: about twenty seconds on 2 cores
def test_two_gloo_processes_train_the_fast_recipe_like_one(tiny_lm, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, tiny_lm.directory, tmp_path), nprocs=2, join=True)

    view = ModelView.from_model(tiny_lm.model)
    single = train_lens(view, ddp_tokens(tiny_lm.directory), DDP_CONFIG, progress=False)
    for rank in range(2):
        state = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert state["shrinkage"] == single.init_shrinkage
        assert state["losses"] == pytest.approx([record.loss for record in single.history], rel=1e-4)
        # Whitening amplifies the float rounding of differently ordered gradient sums along the directions the
        # residuals hardly use, so the lenses agree to 1e-4 of their scale rather than to float precision.
        for name, tensor in single.lens.state_dict().items():
            assert (state["lens"][name] - tensor).abs().max() <= 1e-3 * tensor.abs().max(), name
