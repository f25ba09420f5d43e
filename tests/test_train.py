"""Lens training: the objective and its layer-by-layer backward, the recipe, resume, divergence, the CLI.

Run behaviours (logs, micro-batching, resume, divergence) are checked for both recipes; the fast recipe's own pieces
(closed-form start, chunked KL, its gain over the paper's recipe) are in test_recipes.py.
"""

from __future__ import annotations

import contextlib
import json
import platform

import pytest
import torch
import torch.nn.functional as F
from tiny_models import VOCAB, tiny_model

from lenslab.adapter import ModelView
from lenslab.cli import main
from lenslab.errors import LensLabError
from lenslab.lenses import LogitLens, TunedLens
from lenslab.train import TrainConfig, batches, train_lens
from lenslab.train import loop as train_loop
from lenslab.train.batches import (
    MicroBatchMemory,
    choose_micro_batch,
    free_memory,
    micro_batch_memory,
    micro_batch_sequences,
    sequences_per_step,
    step_indices,
)
from lenslab.train.checkpoints import CHECKPOINT_DIR, LOG_FILE, load_checkpoint
from lenslab.train.config import flag
from lenslab.train.objective import Target, backward_by_layer, backward_chunked, final_target, layer_kl_sum
from lenslab.train.recipes import PaperRecipe

SEQ_LEN = 16
RECIPES = ["paper", "fast"]


@pytest.fixture(scope="module")
def view() -> ModelView:
    return ModelView.from_model(tiny_model("gpt2"))


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    """[48, SEQ_LEN] random token ids: enough for 6 steps of 8 sequences without repeats."""
    return torch.randint(3, VOCAB, (48, SEQ_LEN), generator=torch.Generator().manual_seed(0))


def small_config(**overrides) -> TrainConfig:
    """A few steps of 8 sequences, in micro-batches of 4: fast, and exercising gradient accumulation."""
    settings = {"steps": 6, "tokens_per_step": 8 * SEQ_LEN, "batch_size": 4, "checkpoint_every": 2} | overrides
    return TrainConfig(**settings)


def lens_params(lens: TunedLens) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in lens.state_dict().items()}


def assert_same_lens(a: TunedLens, b: TunedLens, atol: float = 1e-6) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name], atol=atol, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_layer_by_layer_backward_equals_plain_summed_kl(family):
    view = ModelView.from_model(tiny_model(family))
    lens = TunedLens.from_model(view)
    with torch.no_grad():  # a lens away from the identity, so every gradient is informative
        for translator in lens.translators:
            translator.weight.normal_(std=0.1)
            translator.bias.normal_(std=0.1)
    input_ids = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        residuals = view.capture(input_ids)
    n_tokens = input_ids.numel()

    # Reference: every position's mean KL from torch's kl_div, summed, one backward.
    log_p = residuals.logits.log_softmax(-1)
    reference = []
    for layer in range(view.num_layers):
        log_q = lens(residuals.hidden[layer], layer).log_softmax(-1)
        reference.append(F.kl_div(log_q, log_p, log_target=True, reduction="sum") / n_tokens)
    torch.stack(reference).sum().backward()
    expected = {name: param.grad.clone() for name, param in lens.named_parameters()}
    lens.zero_grad()

    target = final_target(residuals.logits)
    sums = backward_by_layer(lens, residuals.hidden, target, 1 / n_tokens, contextlib.nullcontext())
    for name, param in lens.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=1e-4, msg=name)
    torch.testing.assert_close(sums / n_tokens, torch.stack(reference).detach(), atol=1e-5, rtol=1e-4)


def test_untrained_lens_scores_the_logit_lens_kl(view):
    """At zero init the tuned lens is the logit lens, so the objective is the logit lens's KL."""
    input_ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        residuals = view.capture(input_ids)
        target = final_target(residuals.logits)
        logit_lens = LogitLens.from_model(view)
        expected = [
            F.kl_div(logit_lens(residuals.hidden[layer], layer).log_softmax(-1), residuals.logits.log_softmax(-1),
                     log_target=True, reduction="sum")
            for layer in range(view.num_layers)
        ]  # fmt: skip
    sums = backward_by_layer(TunedLens.from_model(view), residuals.hidden, target, 1.0, contextlib.nullcontext())
    torch.testing.assert_close(sums, torch.stack(expected), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Data order and recipe
# ---------------------------------------------------------------------------------------------------


def test_data_order_is_a_function_of_seed_and_step():
    steps = [step_indices(step, 4, 10, seed=3) for step in range(5)]  # 20 reads of 10 sequences: 2 epochs
    epoch_one, epoch_two = torch.cat(steps)[:10], torch.cat(steps)[10:]
    assert sorted(epoch_one.tolist()) == list(range(10)) == sorted(epoch_two.tolist())
    assert not torch.equal(epoch_one, epoch_two)
    assert torch.equal(step_indices(3, 4, 10, seed=3), steps[3])
    assert not torch.equal(step_indices(0, 4, 10, seed=4), steps[0])
    assert sequences_per_step(2**18, 2048) == 128
    assert sequences_per_step(1000, 300, world_size=2) == 4  # 3.3 sequences, rounded up to an even count


def test_micro_batches_are_the_largest_power_of_two_that_fits_in_free_memory():
    memory = MicroBatchMemory(per_token=1000, fixed=10_000)
    # Half of 2 MB, less the fixed 10 kB, holds 990 tokens: 61 sequences of 16, so 32.
    assert micro_batch_sequences(memory, 16, 2_000_000, "cuda") == 32
    assert micro_batch_sequences(memory, 16, None, "cpu") == 2**13 // 16  # free memory unknown: the cap
    assert micro_batch_sequences(memory, 16, 10**12, "cpu") == 2**13 // 16
    assert micro_batch_sequences(memory, 16, 10**12, "cuda") == 2**16 // 16  # a GPU's cap is higher
    assert micro_batch_sequences(memory, 16, 10**12, "mps") == 2**13 // 16  # other devices take the CPU's
    assert micro_batch_sequences(memory, 16, 1000, "cuda") == 1  # not even one sequence fits: one all the same
    assert micro_batch_sequences(memory, 3 * 2**13, 10**12, "cpu") == 1  # a sequence longer than the cap


def test_the_micro_batch_is_chosen_from_the_devices_free_memory_and_logged(view, monkeypatch, caplog):
    chunked, plain = micro_batch_memory(view, SEQ_LEN, chunked=True), micro_batch_memory(view, SEQ_LEN, chunked=False)
    assert chunked.fixed > 0 == plain.fixed and min(chunked.per_token, plain.per_token) > 0
    if platform.system() == "Linux":  # elsewhere the CPU's free memory is unknown (None): the cap alone applies
        assert free_memory(torch.device("cpu")) > 0

    monkeypatch.setattr(batches, "free_memory", lambda device: 2 * (chunked.fixed + 100 * SEQ_LEN * chunked.per_token))
    with caplog.at_level("INFO", logger="lenslab.train.batches"):
        assert choose_micro_batch(view, SEQ_LEN, chunked=True) == 64
    assert "Micro-batches of 64 sequences" in caplog.text
    monkeypatch.setattr(batches, "free_memory", lambda device: chunked.fixed)
    with caplog.at_level("WARNING", logger="lenslab.train.batches"):
        assert choose_micro_batch(view, SEQ_LEN, chunked=True) == 1
    assert "A micro-batch of one sequence needs about" in caplog.text and "--seq-len" in caplog.text


def test_settings_cut_to_what_the_data_holds_are_warned(view, tokens, caplog):
    config = small_config(steps=1, init_tokens=100 * SEQ_LEN, batch_size=16)
    with caplog.at_level("WARNING", logger="lenslab.train.loop"):
        result = train_lens(view, tokens, config, progress=False)
    assert result.init_tokens == len(tokens) * SEQ_LEN
    assert f"--init-tokens {100 * SEQ_LEN} is cut to {len(tokens) * SEQ_LEN}" in caplog.text
    assert f"pass --train-tokens of at least {100 * SEQ_LEN}" in caplog.text
    assert "--batch-size 16 is cut to 8" in caplog.text


def test_paper_recipe_matches_tuned_lens_settings():
    recipe = PaperRecipe(TrainConfig(steps=250))
    optimizer = recipe.build_optimizer([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert group["nesterov"] and group["momentum"] == 0.9 and group["weight_decay"] == 1e-3
    # tuned-lens hands SGD lr_scale * (1 - momentum) and decays it as (steps - step) / steps.
    assert [recipe.learning_rate(s) for s in (0, 125, 249)] == pytest.approx([0.1, 0.05, 0.1 / 250])

    adam = PaperRecipe(TrainConfig(steps=100, optimizer="adam"))
    optimizer = adam.build_optimizer([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["amsgrad"]
    assert [adam.learning_rate(s) for s in (0, 19, 20, 99)] == pytest.approx([5e-5, 1e-3, 1e-3, 1e-3 / 80])


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"steps": 0}, "--steps is 0"),
        ({"tokens_per_step": -5}, "--tokens-per-step"),
        ({"batch_size": 0}, "--batch-size"),
        ({"lr": -1.0}, "--lr"),
        ({"momentum": 1.0}, "--momentum"),
        ({"weight_decay": -1e-3}, "--weight-decay"),
        ({"warmup_steps": 10, "steps": 10}, "--warmup-steps"),
        ({"optimizer": "lion"}, "--optimizer sgd or adam"),
        ({"recipe": "magic"}, "--recipe"),
        ({"seed": -1}, "--seed"),
        ({"checkpoint_every": -1}, "--checkpoint-every"),
    ],
)
def test_config_refuses_nonsense(overrides, pattern):
    with pytest.raises(LensLabError, match=pattern):
        TrainConfig(**overrides)


def test_every_config_field_is_a_cli_flag():
    from lenslab.cli import build_parser

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {option for action in train_parser._actions for option in action.option_strings}
    missing = [name for name in TrainConfig.__dataclass_fields__ if flag(name) not in flags]
    assert not missing


# ---------------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------------


def test_training_lowers_heldout_kl_on_a_trained_model(tiny_lm):
    view = ModelView.from_model(tiny_lm.model)
    chunks = tiny_lm.tokenizer(tiny_lm.train_text_path.read_text()[:60_000])["input_ids"]
    chunks = torch.tensor(chunks[: len(chunks) // 32 * 32]).view(-1, 32)
    train, heldout = chunks[:-16], chunks[-16:]
    config = TrainConfig(recipe="paper", steps=30, tokens_per_step=16 * 32, batch_size=16)
    result = train_lens(view, train, config, progress=False)

    @torch.no_grad()
    def heldout_kl(lens):
        residuals = view.capture(heldout)
        target = final_target(residuals.logits)
        return sum(layer_kl_sum(lens, residuals.hidden[layer], layer, target) for layer in range(view.num_layers))

    history = result.history
    assert history[-1].loss < 0.6 * history[0].loss
    assert heldout_kl(result.lens) < 0.8 * heldout_kl(TunedLens.from_model(view))
    assert [record.step for record in history] == list(range(1, 31))
    assert history[0].lr == pytest.approx(1.0) and history[-1].lr == pytest.approx(1.0 / 30)  # the effective --lr


@pytest.mark.parametrize("recipe", RECIPES)
def test_micro_batch_size_does_not_change_the_lens(view, tokens, recipe):
    whole = train_lens(view, tokens, small_config(steps=3, batch_size=8, recipe=recipe), progress=False)
    pieces = train_lens(view, tokens, small_config(steps=3, batch_size=3, recipe=recipe), progress=False)  # 3+3+2
    assert_same_lens(whole.lens, pieces.lens)


@pytest.mark.parametrize("recipe", RECIPES)
def test_run_writes_log_and_lens_and_removes_checkpoint(view, tokens, tmp_path, recipe):
    result = train_lens(
        view, tokens, small_config(recipe=recipe), output_dir=tmp_path, progress=False, metadata={"note": "x"}
    )
    records = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert set(records[0]) >= {"step", "loss", "layer_losses", "lr", "tokens", "tokens_per_second", "elapsed"}
    assert len(records[0]["layer_losses"]) == view.num_layers and records[-1]["tokens"] == 6 * 8 * SEQ_LEN
    loaded = TunedLens.load(tmp_path, view)
    assert_same_lens(loaded, result.lens, atol=0)
    assert loaded.metadata["note"] == "x" and loaded.metadata["training"]["config"]["steps"] == 6
    assert not (tmp_path / CHECKPOINT_DIR).exists()


class Killed(Exception):
    """Stands in for the process being killed."""


@pytest.mark.parametrize("recipe", RECIPES)
def test_resume_after_interruption_gives_the_same_lens(view, tokens, tmp_path, recipe):
    uninterrupted = train_lens(view, tokens, small_config(recipe=recipe), output_dir=tmp_path / "a", progress=False)

    def kill_after_step_three(record):
        if record.step == 3:
            raise Killed

    with pytest.raises(Killed):
        train_lens(
            view,
            tokens,
            small_config(recipe=recipe),
            output_dir=tmp_path / "b",
            progress=False,
            on_step=kill_after_step_three,
        )
    assert load_checkpoint(tmp_path / "b").step == 2
    resumed_steps = []
    resumed = train_lens(
        view, tokens, small_config(batch_size=8, recipe=recipe), output_dir=tmp_path / "b", progress=False,
        on_step=lambda record: resumed_steps.append(record.step),
    )  # fmt: skip
    assert resumed_steps == [3, 4, 5, 6]  # from the checkpoint, with another micro-batch size
    assert_same_lens(resumed.lens, uninterrupted.lens)
    assert [r.step for r in resumed.history] == list(range(1, 7))
    log_steps = [json.loads(line)["step"] for line in (tmp_path / "b" / LOG_FILE).read_text().splitlines()]
    assert log_steps == list(range(1, 7))  # step 3's first record was dropped with the rest after the checkpoint


@pytest.mark.parametrize("recipe", RECIPES)
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(view, tokens, tmp_path, monkeypatch, recipe):
    calls = []

    def poisoned_target(logits):
        calls.append(1)
        target = final_target(logits)
        # Steps have 2 micro-batches of 4: the 7th call is step 4's first.
        return Target(target.probs * float("nan"), target.entropy) if len(calls) >= 7 else target

    def poisoned_chunked(lens, hidden, scale, **options):
        calls.append(1)
        hidden = [h * float("nan") for h in hidden] if len(calls) >= 7 else hidden
        return backward_chunked(lens, hidden, scale, **options)

    if recipe == "paper":
        monkeypatch.setattr(train_loop, "final_target", poisoned_target)
    else:
        monkeypatch.setattr(train_loop, "backward_chunked", poisoned_chunked)
    config = small_config(checkpoint_every=1, recipe=recipe)
    # Step 3's checkpoint is written only once step 4's loss has shown its lens sound, so step 2's is the last.
    with pytest.raises(LensLabError, match=r"diverged at step 4 .*not finite.*checkpoint \(step 2\) is kept"):
        train_lens(view, tokens, config, output_dir=tmp_path, progress=False)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.step == 2 and all(torch.isfinite(t).all() for t in checkpoint.lens.values())
    assert not (tmp_path / "config.json").exists()

    monkeypatch.undo()  # the cause gone, the run resumes and finishes as if nothing had happened
    resumed = train_lens(view, tokens, config, output_dir=tmp_path, progress=False)
    assert_same_lens(resumed.lens, train_lens(view, tokens, config, progress=False).lens)


def test_output_directory_of_another_configuration_is_refused(view, tokens, tmp_path):
    first = train_lens(view, tokens, small_config(steps=2), output_dir=tmp_path, progress=False)
    before = (tmp_path / "params.safetensors").read_bytes()
    with pytest.raises(LensLabError, match=r"different configuration \(differing in config.lr\).*--overwrite"):
        train_lens(view, tokens, small_config(steps=2, lr=0.5), output_dir=tmp_path, progress=False)
    with pytest.raises(LensLabError, match="differing in data.blake2b, data.shape"):
        train_lens(view, tokens[:40], small_config(steps=2), output_dir=tmp_path, progress=False)
    assert (tmp_path / "params.safetensors").read_bytes() == before

    steps_run = []
    again = train_lens(
        view, tokens, small_config(steps=2), output_dir=tmp_path, progress=False, on_step=steps_run.append
    )
    assert steps_run == [] and len(again.history) == 2  # the same run, already finished: loaded, not retrained
    assert_same_lens(again.lens, first.lens, atol=0)
    with pytest.raises(LensLabError, match="resuming is off; pass --overwrite"):
        train_lens(view, tokens, small_config(steps=2), output_dir=tmp_path, progress=False, resume=False)

    replaced = train_lens(
        view, tokens, small_config(steps=2, lr=0.5), output_dir=tmp_path, progress=False, overwrite=True
    )
    assert_same_lens(TunedLens.load(tmp_path, view), replaced.lens, atol=0)


def test_directory_with_a_foreign_config_is_never_overwritten(view, tokens, tmp_path):
    view.model.config.save_pretrained(tmp_path)
    with pytest.raises(LensLabError, match=r"not empty \(config.json\) and holds no lenslab training run.*--overwrite"):
        train_lens(view, tokens, small_config(steps=1), output_dir=tmp_path, progress=False)
    with pytest.raises(LensLabError, match="holds config.json, which lenslab train did not write.*another --output"):
        train_lens(view, tokens, small_config(steps=1), output_dir=tmp_path, progress=False, overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json"]


def test_tokens_the_model_cannot_read_are_refused(view):
    with pytest.raises(LensLabError, match=f"0..{VOCAB - 1}"):
        train_lens(view, torch.full((4, 8), VOCAB), small_config(), progress=False)
    with pytest.raises(LensLabError, match=r"\[n_sequences, seq_len\]"):
        train_lens(view, torch.zeros(0, 8, dtype=torch.long), small_config(), progress=False)


@pytest.mark.parametrize("recipe", RECIPES)
def test_bias_free_lens_trains(view, tokens, recipe):
    lens = TunedLens.from_model(view, bias=False)
    result = train_lens(view, tokens, small_config(steps=2, recipe=recipe), lens=lens, progress=False)
    assert result.lens is lens and lens.translators[0].weight.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------------


def test_cli_trains_a_lens_end_to_end(tiny_lm, tmp_path, capsys):
    output = tmp_path / "lens"
    args = ["train", "--model", str(tiny_lm.directory), "--data", str(tiny_lm.train_text_path),
            "--output", str(output), "--steps", "3", "--tokens-per-step", "256", "--seq-len", "64",
            "--batch-size", "2", "--init-tokens", "256", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    lens = TunedLens.load(output, tiny_lm.model)
    assert lens.metadata["training"]["config"]["steps"] == 3 and lens.metadata["data"]["seq_len"] == 64
    assert len((output / LOG_FILE).read_text().splitlines()) == 3
    assert f"saved the tuned lens to {output}: 3 steps" in capsys.readouterr().out
    before = (output / "params.safetensors").read_bytes()
    assert main(args) == 0  # the same command again finds the finished lens and leaves it as it is
    assert (output / "params.safetensors").read_bytes() == before
    assert main([*args, "--lr", "0.5"]) == 2
    assert "different configuration (differing in config.lr)" in capsys.readouterr().err


def test_cli_recipe_flag_selects_the_recipe_and_its_defaults(tiny_lm, tmp_path):
    common = ["train", "--model", str(tiny_lm.directory), "--data", str(tiny_lm.train_text_path), "--steps", "2",
              "--tokens-per-step", "128", "--seq-len", "32", "--device", "cpu"]  # fmt: skip
    assert main([*common, "--output", str(tmp_path / "paper"), "--recipe", "paper"]) == 0
    assert main([*common, "--output", str(tmp_path / "fast"), "--init-tokens", "1024"]) == 0
    paper = TunedLens.load(tmp_path / "paper", tiny_lm.model).metadata
    fast = TunedLens.load(tmp_path / "fast", tiny_lm.model).metadata
    assert paper["training"]["config"] | {"recipe": "fast"} != fast["training"]["config"]
    assert (paper["training"]["config"]["optimizer"], paper["init_tokens"]) == ("sgd", 0)
    # --train-tokens defaults to enough for the closed-form start's 1024 tokens, not only the steps' 256.
    assert (fast["training"]["config"]["optimizer"], fast["init_tokens"]) == ("whitened", 1024)
    assert fast["data"]["train_sequences"] == 1024 // 32 and len(fast["init_shrinkage"]) == 4


def test_cli_reports_too_little_data_with_exit_code_2(tiny_lm, tmp_path, capsys):
    args = ["train", "--model", str(tiny_lm.directory), "--data", str(tiny_lm.heldout_text_path),
            "--output", str(tmp_path / "lens"), "--steps", "1000", "--device", "cpu"]  # fmt: skip
    assert main(args) == 2
    assert "lenslab train: error:" in capsys.readouterr().err
    assert not (tmp_path / "lens").exists()
