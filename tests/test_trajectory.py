"""Prediction trajectories (`lenslab.trajectory`): chunked statistics against a full-vocabulary reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, tiny_model
from transformers import AutoModelForCausalLM, GPT2Config

from lenslab.adapter import ModelView
from lenslab.errors import LensLabError
from lenslab.lenses import LogitLens, TunedLens
from lenslab.plots.grid import row_labels
from lenslab.plots.scales import STATISTICS, value_range
from lenslab.trajectory import Trajectory, TrajectoryConfig, compute_trajectories
from lenslab.trajectory_json import trajectories_to_dict, trajectory_to_dict

TOP_K = 4


def sharp_view(family: str) -> ModelView:
    """A tiny random model with a scaled-up unembedding: peaked predictions that differ between positions."""
    model = tiny_model(family)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(6.0)
    return ModelView.from_model(model)


def random_tuned_lens(view: ModelView) -> TunedLens:
    """A tuned lens unlike the logit lens at every position but the last."""
    lens = TunedLens.from_model(view)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for translator in lens.translators:
            translator.weight.copy_(0.3 * torch.randn(translator.weight.shape, generator=generator))
            translator.bias.copy_(0.5 * torch.randn(translator.bias.shape, generator=generator))
    return lens


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference(view: ModelView, lens, ids: torch.Tensor, targets=(), anti_targets=()) -> dict:
    """Every statistic from one float64 softmax over the full [positions, tokens, vocab] tensor.

    The final distribution is the model's own output logits, not a decode of the last residual.
    """
    residuals = view.capture(ids[None])
    final = residuals.logits[0].double().log_softmax(-1)  # [T, V]
    logprobs = torch.stack([lens(h[0], p).double().log_softmax(-1) for p, h in enumerate(residuals.hidden)])
    probs = logprobs.exp()  # [P, T, V]
    order = logprobs.argsort(-1, descending=True)
    next_ids = ids[1:]
    rank_of_next = (order[:, :-1] == next_ids[None, :, None]).int().argmax(-1) + 1  # [P, T-1]
    result = {
        "entropy": -(probs * logprobs).sum(-1),
        "kl_to_final": (final.exp() * (final - logprobs)).sum(-1),
        "top_k_ids": order[..., :TOP_K],
        "top_k_probs": probs.gather(-1, order[..., :TOP_K]),
        "next_token_rank": rank_of_next,
        "next_token_prob": probs[:, :-1].gather(-1, next_ids[None, :, None].expand(len(probs), -1, 1))[..., 0],
    }
    if targets:
        target = logprobs[..., list(targets)].logsumexp(-1)
        anti = logprobs[..., list(anti_targets)].logsumexp(-1) if anti_targets else 0.0
        best = logprobs[..., list(targets)].max(-1).values
        result |= {"target_score": target - anti, "target_rank": (logprobs > best[..., None]).sum(-1) + 1}
    return result


def assert_matches(trajectory: Trajectory, expected: dict) -> None:
    assert torch.equal(trajectory.top_k_ids, expected["top_k_ids"])
    torch.testing.assert_close(trajectory.top_k_probs.double(), expected["top_k_probs"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(trajectory.entropy.double(), expected["entropy"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(trajectory.kl_to_final.double(), expected["kl_to_final"], atol=1e-4, rtol=1e-4)
    assert torch.equal(trajectory.next_token_rank[:, :-1], expected["next_token_rank"])
    assert (trajectory.next_token_rank[:, -1] == -1).all() and trajectory.next_token_prob[:, -1].isnan().all()
    next_prob = trajectory.next_token_prob[:, :-1].double()
    torch.testing.assert_close(next_prob, expected["next_token_prob"], atol=1e-5, rtol=1e-4)
    if "target_score" in expected:
        torch.testing.assert_close(trajectory.target_score.double(), expected["target_score"], atol=1e-4, rtol=1e-4)
        assert torch.equal(trajectory.target_rank, expected["target_rank"])


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
@pytest.mark.parametrize("chunk_elements", [3 * VOCAB, 2**22], ids=["3-token-chunks", "one-chunk"])
def test_statistics_match_full_vocabulary_reference(family, chunk_elements):
    view = sharp_view(family)
    lenses = [LogitLens(view), random_tuned_lens(view)]
    ids = prompt(11)
    config = TrajectoryConfig(top_k=TOP_K, targets=(7, 9), anti_targets=(11,), chunk_elements=chunk_elements)
    trajectories = compute_trajectories(view, lenses, ids, config=config)
    for lens, trajectory in zip(lenses, trajectories):
        assert trajectory.lens_name == lens.kind and trajectory.num_positions == view.num_positions
        assert_matches(trajectory, reference(view, lens, ids, config.targets, config.anti_targets))
        # The last row is the model itself, whatever the lens.
        assert trajectory.kl_to_final[-1].abs().max() < 1e-5
    assert torch.equal(trajectories[0].top_k_ids[-1], trajectories[1].top_k_ids[-1])
    assert not torch.equal(trajectories[0].top_k_ids[:-1], trajectories[1].top_k_ids[:-1])


def test_from_text_and_from_ids_agree_and_name_tokens(tiny_lm):
    lens = LogitLens.from_model(tiny_lm.model)
    text = "The capital of Varnos is"
    trajectory = Trajectory.from_text(tiny_lm.model, tiny_lm.tokenizer, lens, text)
    ids = tiny_lm.tokenizer(text)["input_ids"]
    by_ids = Trajectory.from_ids(tiny_lm.model, lens, torch.tensor([ids]), tokenizer=tiny_lm.tokenizer)
    assert torch.equal(trajectory.top_k_ids, by_ids.top_k_ids)
    assert "".join(trajectory.tokens) == text
    assert trajectory.next_tokens[:-1] == trajectory.tokens[1:] and trajectory.next_tokens[-1] is None
    assert trajectory.layers == ["embeddings", "layer 1", "layer 2", "layer 3", "layer 4"]
    assert row_labels(trajectory)[-1] == "layer 4 (output)"
    with torch.no_grad():
        model_top1 = tiny_lm.model(torch.tensor([ids])).logits[0].argmax(-1)
    assert torch.equal(trajectory.top_k_ids[-1, :, 0], model_top1)


def test_positions_slice_matches_the_full_trajectory_and_fits_long_prompts():
    view = sharp_view("gpt2")  # context of 64 tokens
    lens = LogitLens(view)
    ids = prompt(80)
    full = Trajectory.from_ids(view, lens, ids[:64], config=TrajectoryConfig(top_k=TOP_K))
    part = Trajectory.from_ids(view, lens, ids, config=TrajectoryConfig(top_k=TOP_K, positions=slice(50, 64)))
    assert part.start == 50 and torch.equal(part.input_ids, ids[50:64])
    # The next token after the slice comes from the prompt, even past the end of what the model read.
    assert torch.equal(part.next_ids, ids[51:65])
    assert torch.equal(part.top_k_ids, full.top_k_ids[:, 50:])
    torch.testing.assert_close(part.entropy, full.entropy[:, 50:])
    torch.testing.assert_close(part.next_token_prob[:, :-1], full.next_token_prob[:, 50:-1])
    assert (part.next_token_rank[:, -1] > 0).all()
    with pytest.raises(LensLabError, match=r"prompt has 80 tokens .* reads at most 64.*--positions"):
        Trajectory.from_ids(view, lens, ids)


def test_json_layout_is_plain_json_with_nulls_where_undefined():
    view = sharp_view("gpt2")
    trajectories = compute_trajectories(view, [LogitLens(view), random_tuned_lens(view)], prompt(6),
                                        config=TrajectoryConfig(top_k=3, targets=(5,)))  # fmt: skip
    single = json.loads(json.dumps(trajectory_to_dict(trajectories[0]), allow_nan=False))
    assert single["lens"] == "logit" and single["layers"][-1] == "layer 2" and len(single["tokens"]) == 6
    assert len(single["top_k"]) == 3 and len(single["top_k"][0]) == 6 and len(single["top_k"][0][0]) == 3
    assert set(single["top_k"][0][0][0]) == {"token", "id", "prob"}
    assert single["top_k"][-1][2][0]["id"] == int(trajectories[0].top_k_ids[-1, 2, 0])
    assert single["next_token_rank"][0][-1] is None and single["next_token_prob"][0][-1] is None
    assert all(len(row) == 6 for key in ("entropy", "kl_to_final", "target_score") for row in single[key])
    both = json.loads(json.dumps(trajectories_to_dict(trajectories), allow_nan=False))
    assert list(both["lenses"]) == ["logit", "tuned"] and both["lenses"]["logit"] == single


def test_statistics_share_one_colour_range():
    view = sharp_view("gpt2")
    trajectories = compute_trajectories(view, [LogitLens(view), random_tuned_lens(view)], prompt(6),
                                        config=TrajectoryConfig(targets=(5,), anti_targets=(6,)))  # fmt: skip
    for name in STATISTICS:
        low, high = value_range(trajectories, name)
        for trajectory in trajectories:
            values = trajectory.statistic(name)
            assert values.shape == (3, 6)
            finite = values[~torch.tensor(values).isnan().numpy()]
            assert low <= finite.min() and finite.max() <= high
    assert value_range(trajectories, "target")[0] == -value_range(trajectories, "target")[1]


def test_bad_input_raises_one_clear_error():
    view = sharp_view("gpt2")
    lens = LogitLens(view)
    with pytest.raises(LensLabError, match="prompt is empty"):
        Trajectory.from_ids(view, lens, [])
    with pytest.raises(LensLabError, match="another model"):
        Trajectory.from_ids(tiny_model("gpt2", seed=1), lens, [5, 6])
    with pytest.raises(LensLabError, match="--top-k 1 or more"):
        TrajectoryConfig(top_k=0)
    with pytest.raises(LensLabError, match="without targets"):
        TrajectoryConfig(anti_targets=(3,))
    with pytest.raises(LensLabError, match="selects no tokens"):
        Trajectory.from_ids(view, lens, [5, 6, 7], config=TrajectoryConfig(positions=slice(2, 2)))
    with pytest.raises(LensLabError, match="outside the vocabulary"):
        Trajectory.from_ids(view, lens, [5, 6], config=TrajectoryConfig(targets=(VOCAB,)))
    trajectory = Trajectory.from_ids(view, lens, [5, 6])
    with pytest.raises(LensLabError, match="--target TOKEN"):
        trajectory.statistic("target")
    with pytest.raises(LensLabError, match="--stat one of"):
        trajectory.statistic("loss")


def test_empty_text_prompt_is_an_error(tiny_lm):
    lens = LogitLens.from_model(tiny_lm.model)
    with pytest.raises(LensLabError, match="prompt is empty.*--prompt-file"):
        Trajectory.from_text(tiny_lm.model, tiny_lm.tokenizer, lens, "")


def memory(key: str) -> int:
    """Bytes of ``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, from Linux's /proc."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak memory from Linux's /proc/self/status")
def test_memory_stays_far_below_a_full_vocabulary_tensor():
    vocab, n_tokens, n_layer = 100_000, 128, 4
    full_tensor_bytes = (n_layer + 1) * n_tokens * vocab * 4  # [positions, tokens, vocab] float32: 256 MB
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=n_tokens, n_embd=16, n_layer=n_layer, n_head=2,
                        bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    lens = LogitLens.from_model(model)
    ids = torch.randint(0, vocab, (n_tokens,))
    before = memory("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
    config = TrajectoryConfig(top_k=5, chunk_elements=2**18)
    trajectory = compute_trajectories(model, [lens], ids, config=config)[0]
    growth = memory("VmHWM") - before
    shapes = [tuple(value.shape) for value in vars(trajectory).values() if isinstance(value, torch.Tensor)]
    assert all(vocab not in shape for shape in shapes), shapes
    assert growth < full_tensor_bytes / 10, f"peak resident memory grew by {growth / 2**20:.0f} MiB"
