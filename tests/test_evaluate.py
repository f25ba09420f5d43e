"""Lens evaluation (`lenslab.evaluate`) and `lenslab eval`: streamed metrics against a plain all-at-once reference."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from support.random_lens import random_tuned_lens
from tiny_models import VOCAB, tiny_model
from transformers import AutoModelForCausalLM

from lenslab import evaluate
from lenslab.adapter import ModelView
from lenslab.cli import main
from lenslab.data import DataSpec, TokenData, prepare_tokens
from lenslab.errors import LensLabError
from lenslab.evaluate import EvalResult, evaluate_lenses, transfer_matrix
from lenslab.lenses import LogitLens, TunedLens, layer_names
from lenslab.outputs import mark
from lenslab.plots import plot_curves, plot_transfer
from lenslab.train import TrainConfig, train_lens

METRICS = ("ce", "perplexity", "kl", "entropy", "top1_agreement", "bias_kl")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sharp_view(family: str, seed: int = 0) -> ModelView:
    """A tiny random model whose unembedding is scaled up, so its predictions are far from uniform and lens
    positions differ clearly (a fresh random model predicts nearly uniformly everywhere)."""
    model = tiny_model(family, seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(6.0)
    return ModelView.from_model(model)


def random_tokens(n: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_metrics(view: ModelView, lenses: dict, tokens: torch.Tensor) -> dict:
    """Every metric from one full softmax over all positions, all tokens and all lenses at once, in float64.

    The model's prediction is its own output logits (not a decode of the last residual).
    """
    residuals = view.capture(tokens)
    final = residuals.logits[:, :-1].double().log_softmax(-1)  # [n, seq - 1, vocab]
    targets = tokens[:, 1:]
    final_marginal = final.exp().mean((0, 1))  # [vocab]

    def kl(log_p, log_q):
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    result = {"final_ce": -final.gather(-1, targets[..., None]).mean().item()}
    result["final_entropy"] = -(final.exp() * final).sum(-1).mean().item()
    for name, lens in lenses.items():
        # [positions, n, seq - 1, vocab]
        logp = torch.stack([lens(h, p) for p, h in enumerate(residuals.hidden)])[:, :, :-1].double().log_softmax(-1)
        ce = -logp.gather(-1, targets[None, ..., None].expand(len(logp), -1, -1, 1)).mean((1, 2, 3))
        marginal = logp.exp().mean((1, 2))  # [positions, vocab]
        result[name] = {
            "ce": ce,
            "perplexity": ce.exp(),
            "kl": kl(final[None], logp).mean((1, 2)),
            "entropy": -(logp.exp() * logp).sum(-1).mean((1, 2)),
            "top1_agreement": (logp.argmax(-1) == final.argmax(-1)[None]).double().mean((1, 2)),
            "bias_kl": kl(final_marginal.log()[None], marginal.log()),
        }
    return result


@pytest.mark.parametrize("family", ["gpt2", "opt-350m", "gemma2"])  # LayerNorm; no final norm + project_out; softcap
def test_streamed_metrics_match_full_reference(family, monkeypatch):
    view = sharp_view(family)
    lenses = {"logit": LogitLens(view), "tuned": random_tuned_lens(view)}
    tokens = random_tokens(5, 12)
    # Batches of 2 (the last one short) and row slices of 7 tokens, so sums cross batch and slice boundaries.
    monkeypatch.setattr(evaluate, "_ELEMENTS_PER_STEP", 7 * view.vocab_size)
    result = evaluate_lenses(view, lenses, tokens, batch_size=2, bits_per_byte_factor=0.4)
    expected = reference_metrics(view, lenses, tokens)

    assert result.tokens == 5 * 11
    assert result.final_ce == pytest.approx(expected["final_ce"], rel=1e-5)
    assert result.final_entropy == pytest.approx(expected["final_entropy"], rel=1e-5)
    for name in lenses:
        for metric in METRICS:
            got = torch.tensor(getattr(result.lenses[name], metric), dtype=torch.float64)
            torch.testing.assert_close(got, expected[name][metric], rtol=1e-4, atol=1e-6, msg=f"{name} {metric}")
    # The lenses really differ before the last position, or this test would say little.
    assert min(abs(a - b) for a, b in zip(result.lenses["logit"].kl[:-1], result.lenses["tuned"].kl[:-1])) > 1e-4


def test_last_position_is_the_model_itself():
    view = sharp_view("llama")
    result = evaluate_lenses(
        view, {"logit": LogitLens(view), "tuned": random_tuned_lens(view)}, random_tokens(3, 10), batch_size=2
    )
    for metrics in result.lenses.values():
        assert metrics.kl[-1] == 0.0 and metrics.bias_kl[-1] == 0.0 and metrics.top1_agreement[-1] == 1.0
        assert metrics.ce[-1] == pytest.approx(result.final_ce) and metrics.entropy[-1] == pytest.approx(
            result.final_entropy
        )
        assert all(kl > 0 for kl in metrics.kl[:-1])


def test_bfloat16_model_is_scored_in_float32():
    view = sharp_view("gpt2")
    view.model.to(torch.bfloat16)
    lens = LogitLens(view)
    tokens = random_tokens(2, 10)
    result = evaluate_lenses(view, {"logit": lens}, tokens)
    expected = reference_metrics(view, {"logit": lens}, tokens)
    # bf16 logits, but softmax statistics in float32: agreement with a float64 softmax of the same logits.
    torch.testing.assert_close(torch.tensor(result.lenses["logit"].ce, dtype=torch.float64), expected["logit"]["ce"])
    torch.testing.assert_close(torch.tensor(result.lenses["logit"].kl[:-1], dtype=torch.float64),
                               expected["logit"]["kl"][:-1], rtol=1e-3, atol=1e-5)  # fmt: skip


def test_json_layout():
    view = sharp_view("gpt2")
    result = evaluate_lenses(
        view, {"logit": LogitLens(view), "tuned": random_tuned_lens(view)}, random_tokens(2, 6),
        bits_per_byte_factor=0.37,
    )  # fmt: skip
    data = json.loads(json.dumps(result.to_json()))  # plain JSON types only
    assert data["model"] == "GPT2LMHeadModel" and data["tokens"] == 10 and data["nats_to_bits_per_byte"] == 0.37
    assert data["layers"] == ["embeddings", "layer 1", "layer 2"] == layer_names(view)
    assert set(data["final"]) == {"ce", "entropy"} and all(isinstance(v, float) for v in data["final"].values())
    assert list(data["lenses"]) == ["logit", "tuned"]
    for metrics in data["lenses"].values():
        assert set(metrics) == set(METRICS)
        assert all(len(values) == 3 and all(isinstance(v, float) for v in values) for values in metrics.values())
    assert "transfer" not in data


def test_transfer_matrix_diagonal_is_the_per_layer_kl():
    view = sharp_view("gpt2")
    lens = random_tuned_lens(view)
    tokens = random_tokens(3, 8)
    per_layer = evaluate_lenses(view, {"logit": LogitLens(view), "tuned": lens}, tokens, batch_size=2)
    matrix = transfer_matrix(view, lens, tokens, batch_size=2)
    positions = view.num_positions
    assert len(matrix.kl) == len(matrix.ce) == positions and all(len(row) == positions for row in matrix.kl)
    diagonal = [matrix.kl[i][i] for i in range(positions)]
    assert diagonal == pytest.approx(per_layer.lenses["tuned"].kl, rel=1e-5, abs=1e-7)
    assert [matrix.ce[i][i] for i in range(positions)] == pytest.approx(per_layer.lenses["tuned"].ce, rel=1e-5)
    # The last translator is the identity: that row is the logit lens at every position.
    assert matrix.kl[-1] == pytest.approx(per_layer.lenses["logit"].kl, rel=1e-5, abs=1e-7)
    assert matrix.kl[0][1] != pytest.approx(matrix.kl[1][1], rel=1e-3)


def test_png_writers(tmp_path):
    view = sharp_view("gpt2")
    lens = random_tuned_lens(view)
    tokens = random_tokens(2, 6)
    result = evaluate_lenses(view, {"logit": LogitLens(view), "tuned": lens}, tokens, bits_per_byte_factor=0.5)
    with pytest.raises(LensLabError, match="no transfer matrix"):
        plot_transfer(result, tmp_path / "transfer.png")
    result.transfer["tuned"] = transfer_matrix(view, lens, tokens)
    assert plot_curves(result, tmp_path / "curves.png").read_bytes().startswith(PNG_MAGIC)
    assert plot_transfer(result, tmp_path / "transfer.png", units="nats").read_bytes().startswith(PNG_MAGIC)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["curves.png", "transfer.png"]  # no temporaries


def test_bits_per_byte_need_the_factor():
    result = EvalResult("m", 1, None, ["embeddings"], 1.0, 1.0, {})
    assert result.unit_factor("nats") == 1.0
    with pytest.raises(LensLabError, match="--units nats"):
        result.unit_factor("bits-per-byte")


def test_bad_inputs():
    view = sharp_view("gpt2")
    other = sharp_view("gpt2", seed=1)
    with pytest.raises(LensLabError, match="was built for .* not for the evaluated"):
        evaluate_lenses(view, {"logit": LogitLens(other)}, random_tokens(1, 4))
    with pytest.raises(LensLabError, match="seq_len >= 2"):
        evaluate_lenses(view, {"logit": LogitLens(view)}, random_tokens(3, 1))
    with pytest.raises(LensLabError, match="n_sequences >= 1"):
        evaluate_lenses(view, {"logit": LogitLens(view)}, random_tokens(0, 8))
    with pytest.raises(LensLabError, match="No lens"):
        evaluate_lenses(view, {}, random_tokens(1, 4))
    with pytest.raises(LensLabError, match="--batch-size"):
        transfer_matrix(view, LogitLens(view), random_tokens(1, 4), batch_size=0)


# ---------------------------------------------------------------------------------------------------
# On the trained tiny LM: a trained lens beats the logit lens; `lenslab eval` end to end
# ---------------------------------------------------------------------------------------------------

SEQ_LEN = 64


@pytest.fixture(scope="module")
def trained_lens(tiny_lm, tmp_path_factory):
    """A tuned lens briefly trained on the tiny LM's training text, saved to a directory."""
    view = ModelView.from_model(tiny_lm.model)
    data = prepare_tokens(
        DataSpec(str(tiny_lm.train_text_path)), tiny_lm.tokenizer, train_tokens=2**15, heldout_tokens=0, seq_len=SEQ_LEN
    )
    config = TrainConfig(steps=40, tokens_per_step=16 * SEQ_LEN, batch_size=16)
    lens = train_lens(view, data.train, config, progress=False).lens
    directory = tmp_path_factory.mktemp("lens") / "tiny-tuned"
    lens.save(directory)
    return lens, directory


def heldout_tokens(tiny_lm, n: int) -> TokenData:
    return prepare_tokens(
        DataSpec(str(tiny_lm.heldout_text_path)), tiny_lm.tokenizer, train_tokens=0, heldout_tokens=n, seq_len=SEQ_LEN
    )


def test_trained_lens_beats_logit_lens_on_heldout_text(tiny_lm, trained_lens):
    lens, _ = trained_lens
    view = lens.view
    data = heldout_tokens(tiny_lm, 2**12)
    result = evaluate_lenses(view, {"logit": LogitLens(view), "tuned": lens}, data.heldout, batch_size=16)
    tuned, logit = result.lenses["tuned"].kl, result.lenses["logit"].kl
    assert all(ours < theirs for ours, theirs in zip(tuned[:-1], logit[:-1])), (tuned, logit)
    assert tuned[-1] == logit[-1] == 0.0


def run_eval(tiny_lm, output, *extra) -> int:
    return main([
        "eval", "--model", str(tiny_lm.directory), "--data", str(tiny_lm.heldout_text_path), "--device", "cpu",
        "--seq-len", str(SEQ_LEN), "--tokens", "512", "--output", str(output), *extra,
    ])  # fmt: skip


def test_cli_writes_json_png_and_table(tiny_lm, trained_lens, tmp_path, capsys):
    _, directory = trained_lens
    output = tmp_path / "out" / "eval.json"
    assert run_eval(tiny_lm, output, "--lens", str(directory), "--lens", str(directory), "--transfer") == 0
    data = json.loads(output.read_text())
    num_positions = tiny_lm.model.config.n_layer + 1
    assert list(data["lenses"]) == ["logit", "tuned"]  # the same directory twice is one lens, named "tuned"
    assert data["tokens"] == 8 * (SEQ_LEN - 1) and data["model"] == str(tiny_lm.directory)
    assert 0 < data["nats_to_bits_per_byte"] < 2 and len(data["layers"]) == num_positions
    assert {"ce", "entropy"} <= set(data["final"])
    assert all(len(values) == num_positions for values in data["lenses"]["tuned"].values())
    assert len(data["transfer"]["tuned"]["kl"]) == num_positions
    for png in ("eval.png", "eval-transfer.png"):
        assert (output.parent / png).read_bytes().startswith(PNG_MAGIC)
    assert sorted(path.name for path in output.parent.iterdir()) == ["eval-transfer.png", "eval.json", "eval.png"]
    table = capsys.readouterr().out
    assert "embeddings" in table and f"layer {num_positions - 1}" in table and "bpb" in table


def test_cli_names_several_lenses_by_directory(tiny_lm, trained_lens, tmp_path):
    _, directory = trained_lens
    copy = tmp_path / "logit"  # a directory name that must not hide the logit lens
    shutil.copytree(directory, copy)
    output = tmp_path / "eval.json"
    plot = tmp_path / "pictures" / "curves.png"
    assert run_eval(tiny_lm, output, "--lens", str(directory), "--lens", str(copy), "--plot", str(plot),
                    "--units", "nats") == 0  # fmt: skip
    data = json.loads(output.read_text())
    assert list(data["lenses"]) == ["logit", "tiny-tuned", "logit-2"]
    assert data["lenses"]["tiny-tuned"] == data["lenses"]["logit-2"]
    assert plot.read_bytes().startswith(PNG_MAGIC) and not (tmp_path / "eval.png").exists()


def test_cli_refuses_a_lens_for_another_model(tiny_lm, tmp_path, capsys):
    other = AutoModelForCausalLM.from_config(tiny_lm.model.config)  # same shapes, other weights
    foreign = tmp_path / "foreign"
    TunedLens.from_model(other).save(foreign)
    output = tmp_path / "eval.json"
    earlier = json.dumps(mark("eval")) + "\n"  # an earlier run's results, which a new run may replace
    output.write_text(earlier)
    assert run_eval(tiny_lm, output, "--lens", str(foreign)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lenslab eval: error:")]
    assert len(errors) == 1 and "unembedding differs" in errors[0] and "--allow-model-mismatch" in errors[0]
    assert output.read_text() == earlier
    assert sorted(path.name for path in tmp_path.iterdir()) == ["eval.json", "foreign"]
    # The escape hatch the error names works.
    assert run_eval(tiny_lm, output, "--lens", str(foreign), "--allow-model-mismatch") == 0


def test_cli_refuses_too_few_tokens(tiny_lm, tmp_path, capsys):
    output = tmp_path / "eval.json"
    assert run_eval(tiny_lm, output, "--tokens", str(10**8)) == 2
    assert "--heldout-tokens" in capsys.readouterr().err  # the data module's flag, an alias of --tokens
    with pytest.raises(SystemExit) as exit_info:
        run_eval(tiny_lm, output, "--tokens", "0")
    assert exit_info.value.code == 2
    assert "--transfer needs" in _error_of(run_eval(tiny_lm, output, "--transfer"), capsys)
    assert not output.exists()


def _error_of(code: int, capsys) -> str:
    assert code == 2
    return capsys.readouterr().err
