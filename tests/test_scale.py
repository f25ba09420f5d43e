"""Size-dependent arithmetic at sizes past its limits, where the tiny models of the other tests never reach.

Two kinds of failure only show on real models: index arithmetic that overflows or rounds (a float32 index is
exact only up to 2^24, an int32 flat index up to 2^31), and analyses that hold a [tokens, vocab] tensor, which
a 262k-token vocabulary turns into gigabytes. The first kind is tested with large-but-cheap inputs to the
functions themselves; the second with a random model of a 50,000-token vocabulary and tiny layers, counting the
most bytes of tensors alive at once against one float32 [tokens, vocab] tensor, with every module's chunk budget
lowered to one vocabulary-wide row.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from lenslab import evaluate as evaluate_module
from lenslab import lenses as lenses_module
from lenslab.adapter import ModelView
from lenslab.applications.depth import learned_checkpoint, prediction_depth
from lenslab.applications.detect import choice_features
from lenslab.applications.prompts import ChoicePrompt
from lenslab.causal import Ablation, CausalBasis, FastConfig, model_influences, stimulus_response_alignment
from lenslab.causal import influence as influence_module
from lenslab.causal import reference as reference_module
from lenslab.causal.fast import fast_directions
from lenslab.causal.reference import initial_directions, reference_directions
from lenslab.compatibility import fingerprint_indices, fingerprint_matches, unembed_fingerprint
from lenslab.errors import LensModelMismatch
from lenslab.evaluate import evaluate_lenses
from lenslab.lenses import LogitLens, TunedLens
from lenslab.trajectory import _rank

WIDE_VOCAB = 50_000
"""Vocabulary of the memory tests' model: a [256, vocab] float32 tensor is 51 MB."""
CHUNK_LOGITS = 2**16
"""Chunk budget (logits) the memory tests set: one vocabulary-wide row, 0.2 MB of float32."""
SEQUENCES, SEQ_LEN = 2, 128

# ---------------------------------------------------------------------------------------------------
# Index arithmetic
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", [2**24 + 1, 65537 * 300, 2**31 + 7, 262_144 * 8192, 2**40 + 3])
def test_fingerprint_indices_stay_in_range_and_reach_the_last_entry(numel):
    index = fingerprint_indices(numel)
    assert index.dtype == torch.int64
    assert index[0] == 0 and index[-1] == numel - 1
    assert bool((index.diff() > 0).all())


def test_fingerprint_of_an_unembedding_past_2_to_the_24():
    weight = torch.randn(65537, 300, generator=torch.Generator().manual_seed(0))  # 19.7M entries > 2^24
    stored = unembed_fingerprint(weight)
    assert max(stored["index"]) == weight.numel() - 1
    assert stored["sample"][-1] == weight[-1, -1].item()
    assert fingerprint_matches(stored, weight)
    assert fingerprint_matches(stored, weight.bfloat16())  # the same model loaded in another dtype
    assert not fingerprint_matches(stored, weight * 1.5)


def test_tuned_lens_of_a_large_unembedding_saves_and_loads(tmp_path):
    config = GPT2Config(vocab_size=65537, n_embd=300, n_layer=1, n_head=4, n_positions=16, bos_token_id=1,
                        eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    view = ModelView.from_model(AutoModelForCausalLM.from_config(config).eval())
    assert view.unembedding_weight().numel() > 2**24
    lens = TunedLens.from_model(view)
    with torch.no_grad():
        lens.translators[0].bias.fill_(0.25)
    loaded = TunedLens.load(lens.save(tmp_path / "lens"), view)
    torch.testing.assert_close(loaded.translators[0].bias, lens.translators[0].bias)
    with torch.no_grad():
        view.unembedding_weight().mul_(1.5)
    with pytest.raises(LensModelMismatch):
        TunedLens.load(tmp_path / "lens", view)


def test_rank_past_2_to_the_24():
    # Ranks are counted exactly (an integer sum), not in float32, whose integers stop at 2^24.
    logprobs = torch.zeros(1, 2**24 + 9)
    logprobs[0, :4] = -2.0
    chosen = torch.tensor([[-1.0]])
    assert _rank(logprobs, chosen).item() == 2**24 + 9 - 4 + 1
    assert _rank(logprobs, logprobs[:, :1]).item() == 2**24 + 9 - 4 + 1  # ties share the best rank


# ---------------------------------------------------------------------------------------------------
# Memory of the vocabulary-wide analyses
# ---------------------------------------------------------------------------------------------------


def peak_tensor_bytes(run: Callable[[], object]) -> int:
    """Most bytes of tensors alive at once while ``run()`` runs, beyond those alive before.

    Counted exactly from the CPU allocator's events in torch's profiler (each allocation and free with its size),
    so neither the C library's reuse of freed pages nor the other tests' allocations blur it.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    events = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    events.sort(key=lambda event: event.start_ns())
    return max(itertools.accumulate(event.nbytes() for event in events), default=0)


def assert_bounded(run: Callable[[], object], rows: int) -> None:
    """``run()`` holds far less than one float32 [rows, vocab] tensor at any time."""
    full = rows * WIDE_VOCAB * 4
    peak = peak_tensor_bytes(run)
    assert 0 < peak < full / 4, f"{peak / 2**20:.1f} MiB of tensors were alive at once, against {full / 2**20:.0f} MiB"


@pytest.fixture(scope="module")
def wide_view() -> ModelView:
    """A random 1-layer GPT-2 of width 16 with a 50,000-token vocabulary."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=WIDE_VOCAB, n_positions=SEQ_LEN, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=1, eos_token_id=2)  # fmt: skip
    return ModelView.from_model(AutoModelForCausalLM.from_config(config).eval())


@pytest.fixture(scope="module")
def wide_tokens() -> torch.Tensor:
    """[2, 128] random token ids."""
    return torch.randint(0, WIDE_VOCAB, (SEQUENCES, SEQ_LEN), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def small_chunks(monkeypatch):
    """Every vocabulary-wide loop in chunks of `CHUNK_LOGITS` logits, on one thread.

    One thread, because the loops then run hundreds of small operations, and on a busy CPU each two-thread
    parallel region waits on the scheduler: the tests ran ten times slower with two.
    """
    monkeypatch.setattr(lenses_module, "LOGITS_PER_CHUNK", CHUNK_LOGITS)
    monkeypatch.setattr(evaluate_module, "_ELEMENTS_PER_STEP", CHUNK_LOGITS)
    monkeypatch.setattr(influence_module, "MAX_LOGITS_PER_CHUNK", CHUNK_LOGITS)
    monkeypatch.setattr(reference_module, "CACHED_LOGITS", CHUNK_LOGITS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_evaluation_memory(wide_view, wide_tokens, small_chunks):
    lenses = {"logit": LogitLens(wide_view)}
    assert_bounded(lambda: evaluate_lenses(wide_view, lenses, wide_tokens, batch_size=SEQUENCES), wide_tokens.numel())


def test_prediction_depth_memory(wide_view, wide_tokens, small_chunks):
    lens, rows = LogitLens(wide_view), wide_tokens.numel()
    assert_bounded(lambda: prediction_depth(wide_view, lens, wide_tokens, batch_size=SEQUENCES), rows)
    assert_bounded(lambda: learned_checkpoint([wide_view.model], wide_tokens, batch_size=SEQUENCES), rows)


class NumberTokenizer:
    """Each space-separated number is its token id: prompts and choices of any length, with no vocabulary file."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [int(word) for word in text.split()]}


def test_choice_features_memory(wide_view, small_chunks):
    # 8 sequences of 16 prompt tokens and 32 choice tokens: 256 vocabulary-wide rows in one batch.
    words = [str(i) for i in range(3, 3 + 32)]
    prompts = [ChoicePrompt(" ".join(["5"] * 16), [" ".join(words), " ".join(reversed(words))]) for _ in range(4)]
    lenses = {"logit": LogitLens(wide_view)}
    assert_bounded(lambda: choice_features(wide_view, NumberTokenizer(), lenses, prompts, batch_size=8), 256)


@pytest.fixture(scope="module")
def wide_residuals(wide_view, wide_tokens) -> torch.Tensor:
    """[2, 128, 16] residuals at lens position 0 (the embeddings)."""
    with torch.no_grad():
        return wide_view.capture(wide_tokens, positions=[0], need_logits=False).hidden[0]


def test_causal_extraction_memory(wide_view, wide_residuals, small_chunks):
    lens, h = LogitLens(wide_view), wide_residuals.flatten(0, 1)
    mean = h.mean(0)
    assert_bounded(lambda: reference_directions(lens, 0, h, mean, 1, max_evaluations=1), len(h))
    config = FastConfig(gradient_samples=1, surrogate_steps=1, selection_tokens=16, steps=1, batch_tokens=len(h))
    assert_bounded(lambda: fast_directions(lens, 0, h, mean, 2, config=config), 2 * config.batch_tokens)
    # Gradients are taken with respect to the directions alone: none lands in a [vocab, d_model] .grad.
    assert all(parameter.grad is None for parameter in wide_view.model.parameters())


def test_unembedding_gram_is_summed_in_slices(wide_view, small_chunks):
    weight = wide_view.unembedding_weight().detach().double()
    expected = torch.linalg.eigh(weight.T @ weight).eigenvectors.flip(-1).T[:3].float()
    directions = initial_directions(LogitLens(wide_view), 16, 3)
    torch.testing.assert_close((directions * expected).sum(-1).abs(), torch.ones(3))  # the same, up to sign


def test_causal_model_analyses_memory(wide_view, wide_tokens, wide_residuals, small_chunks):
    lens = LogitLens(wide_view)
    ablation = Ablation.from_sample("mean", wide_residuals)
    directions = torch.eye(16)[:1]
    basis = CausalBasis(layer=0, directions=directions, influences=torch.ones(1), ablation=ablation, method="fast")
    rows = wide_tokens.numel()
    assert_bounded(lambda: model_influences(wide_view, wide_tokens, wide_residuals, basis, batch_size=SEQUENCES), rows)
    assert_bounded(
        lambda: stimulus_response_alignment(wide_view, lens, wide_tokens, wide_residuals, 0, batch_size=SEQUENCES), rows
    )


def test_reference_extraction_does_not_depend_on_the_cache(wide_view, wide_residuals, monkeypatch):
    lens, h = LogitLens(wide_view), wide_residuals.flatten(0, 1)[:96]
    cached = reference_directions(lens, 0, h, h.mean(0), 1, max_evaluations=3)
    monkeypatch.setattr(reference_module, "CACHED_LOGITS", 0)  # recomputed every evaluation
    recomputed = reference_directions(lens, 0, h, h.mean(0), 1, max_evaluations=3)
    torch.testing.assert_close(recomputed, cached)
