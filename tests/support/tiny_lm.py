"""A small causal LM trained in seconds on synthetic text, for tests that need a *trained* model.

Random tiny models (``tests/tiny_models.py``) say nothing about lens quality: their layers do not
refine a prediction. This module trains a GPT-2 (4 layers, width 64, 768 BPE tokens) for about
25 s on one CPU core on a toy language with structure of several kinds:

- local syntax: articles, adjectives and subject-verb agreement (``the cat chases`` / ``the cats chase``);
- counting (``three, four, five, six``), a rule applied to the previous word;
- facts from a fixed table (``The capital of Darra is Shiru``), the same for every seed;
- names and a code word chosen per document and repeated within it, predictable only by copying
  from context.

With the default recipe the held-out loss falls from 6.66 to 1.54 nats/token (unigram entropy 4.67):
agreement and counting are learnt (counting ~98% top-1), the facts partly (~17% top-1 on the
capital), in-context copying not yet (it needs several times more steps). The logit lens's KL to the
final output falls over depth, roughly 11.7, 1.2, 1.0, 0.4, 0 nats after the embedding and blocks 1-4.

>>> docs = generate_corpus(2, seed=0)
>>> docs == generate_corpus(2, seed=0) and docs != generate_corpus(2, seed=1)
True
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"
"""End-of-text token; also the tokenizer's bos and pad token, as in GPT-2."""

TRAIN_FILE = "corpus_train.txt"
"""Training documents in the output directory, separated by blank lines."""

HELDOUT_FILE = "corpus_heldout.txt"
"""Held-out documents (never trained on) in the output directory, separated by blank lines."""

METRICS_FILE = "tiny_lm.json"
"""Training record in the output directory; written last, so its presence means training finished."""

# ---------------------------------------------------------------------------------------------------
# The toy language
# ---------------------------------------------------------------------------------------------------

_NOUNS = {  # singular -> plural
    "cat": "cats",
    "dog": "dogs",
    "bird": "birds",
    "fox": "foxes",
    "horse": "horses",
    "child": "children",
    "farmer": "farmers",
    "king": "kings",
    "queen": "queens",
    "baker": "bakers",
    "wolf": "wolves",
    "mouse": "mice",
    "sailor": "sailors",
    "teacher": "teachers",
}
_VERBS = {  # plural / base form -> third person singular
    "see": "sees",
    "chase": "chases",
    "like": "likes",
    "follow": "follows",
    "help": "helps",
    "watch": "watches",
    "find": "finds",
    "call": "calls",
    "feed": "feeds",
    "carry": "carries",
}
_ADJECTIVES = ["big", "small", "old", "young", "red", "green", "quiet", "brave", "happy", "tired", "clever"]
_THINGS = ["apple", "book", "hat", "cake", "letter", "stone", "lamp", "ring", "basket", "map"]
_PLACES = ["the market", "the forest", "the river", "the castle", "the garden", "the harbour", "the hill"]
_NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
_SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ra",
    "ten",
    "vo",
    "shi",
    "dar",
    "bel",
    "nu",
    "po",
    "zan",
    "fi",
    "gor",
    "el",
    "tha",
    "ru",
    "sen",
    "wi",
    "mor",
    "quo",
    "ix",
    "ban",
    "le",
]


def _word(rng: random.Random, min_syllables: int, max_syllables: int) -> str:
    """A pronounceable made-up word; many are split into several BPE tokens."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(min_syllables, max_syllables)))


# The fact table is drawn from its own constant seed so every corpus seed states the same facts:
# held-out text from any seed is then predictable by a model trained on any other.
_FACT_RNG = random.Random(20230314)
# Few enough countries that a few hundred steps memorise most capitals.
_COUNTRIES = sorted({_word(_FACT_RNG, 2, 3).capitalize() for _ in range(16)})
_CAPITALS = {country: _word(_FACT_RNG, 2, 2).capitalize() for country in _COUNTRIES}
_EXPORTS = {country: _FACT_RNG.choice(_THINGS) for country in _COUNTRIES}
_NAMES = sorted({_word(_FACT_RNG, 2, 3).capitalize() for _ in range(80)})


def _noun_phrase(rng: random.Random, plural: bool) -> str:
    """``the cat``, ``a small dog`` or ``the two brave wolves``; plurals never take ``a``."""
    noun = rng.choice(list(_NOUNS))
    adjective = rng.choice(_ADJECTIVES) + " " if rng.random() < 0.5 else ""
    if plural:
        count = rng.choice(_NUMBERS[1:5]) + " " if rng.random() < 0.3 else ""
        return f"the {count}{adjective}{_NOUNS[noun]}"
    article = "the" if rng.random() < 0.6 else ("an" if (adjective or noun)[0] in "aeiou" else "a")
    return f"{article} {adjective}{noun}"


def _syntax_sentence(rng: random.Random, names: list[str]) -> str:
    """Subject-verb agreement: the verb's form depends on the subject several tokens back."""
    plural = rng.random() < 0.5
    subject = _noun_phrase(rng, plural)
    verb = rng.choice(list(_VERBS))
    obj = _noun_phrase(rng, rng.random() < 0.5) if rng.random() < 0.7 else rng.choice(names)
    return f"{subject.capitalize()} {verb if plural else _VERBS[verb]} {obj} near {rng.choice(_PLACES)}."


def _fact_sentence(rng: random.Random, names: list[str]) -> str:
    """A fact from the fixed table: predicting the capital needs memory, not context."""
    country = rng.choice(_COUNTRIES)
    if rng.random() < 0.6:
        return f"The capital of {country} is {_CAPITALS[country]}."
    return f"{rng.choice(names)} said that {country} sells the best {_EXPORTS[country]}s."


def _counting_sentence(rng: random.Random, names: list[str]) -> str:
    """A run of number words: each next word follows from the previous by a rule."""
    start = rng.randrange(len(_NUMBERS) - 3)
    stop = rng.randint(start + 3, len(_NUMBERS))
    return f"{rng.choice(names)} counted {', '.join(_NUMBERS[start:stop])}."


def _copy_sentence(rng: random.Random, names: list[str], code: str) -> str:
    """The document's code word again: only copying from earlier in the document predicts it."""
    speaker, listener = rng.sample(names, 2)
    return f"{speaker} told {listener} the word {code} at {rng.choice(_PLACES)}."


def _story_sentence(rng: random.Random, names: list[str]) -> str:
    """The document's two characters interacting, so their names recur."""
    giver, taker = rng.sample(names, 2)
    thing = rng.choice(_THINGS)
    return f"{giver} gave {taker} {'an' if thing[0] in 'aeiou' else 'a'} {thing}, and {taker} thanked {giver}."


def _document(rng: random.Random) -> str:
    """A few sentences about two characters and a code word that are new to this document."""
    names = rng.sample(_NAMES, 2)
    code = _word(rng, 2, 4)
    sentences = [f"{names[0]} met {names[1]} at {rng.choice(_PLACES)} and said the word {code}."]
    makers = [_syntax_sentence, _fact_sentence, _counting_sentence, _story_sentence]
    for _ in range(rng.randint(3, 6)):
        if rng.random() < 0.15:
            sentences.append(_copy_sentence(rng, names, code))
        else:
            sentences.append(rng.choice(makers)(rng, names))
    return " ".join(sentences)


def generate_corpus(n_documents: int, seed: int) -> list[str]:
    """``n_documents`` synthetic documents of a few sentences each; the same list for the same seed.

    >>> generate_corpus(1, seed=3)[0].split(".")[0]
    'Minura met Zanfimi at the harbour and said the word tenzanmortha'
    """
    rng = random.Random(seed)
    return [_document(rng) for _ in range(n_documents)]


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int = 768) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens learnt from ``texts``, offline.

    ``<|endoftext|>`` is token 0 and serves as eos, bos and pad. Byte-level means any text encodes,
    so later users can feed text the corpus never contained.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def pack(tokenizer: PreTrainedTokenizerFast, documents: list[str], chunk_length: int) -> torch.Tensor:
    """Documents joined by eos and cut into full chunks: ``[n_chunks, chunk_length]`` token ids."""
    ids = [i for ids in tokenizer(documents)["input_ids"] for i in [*ids, tokenizer.eos_token_id]]
    n_chunks = len(ids) // chunk_length
    return torch.tensor(ids[: n_chunks * chunk_length]).view(n_chunks, chunk_length)


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def mean_loss(model: GPT2LMHeadModel, chunks: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy in nats over ``chunks: [n_chunks, seq]``."""
    model.eval()
    total, count = 0.0, 0
    for batch in chunks.split(batch_size):
        loss = model(input_ids=batch, labels=batch).loss
        total += loss.item() * batch.numel()
        count += batch.numel()
    return total / count


def unigram_entropy(chunks: torch.Tensor, vocab_size: int) -> float:
    """Entropy in nats of the token frequencies in ``chunks``: the loss of the best context-free model."""
    counts = torch.bincount(chunks.flatten(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def _write_documents(path: Path, documents: list[str]) -> None:
    # Documents never contain a newline, so a blank line separates them unambiguously.
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")


def read_documents(path: str | Path) -> list[str]:
    """The documents of a :data:`TRAIN_FILE` or :data:`HELDOUT_FILE`, in order."""
    return Path(path).read_text(encoding="utf-8").strip().split("\n\n")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block, then restore the previous count.

    On a busy machine (shared dev boxes, CI beside other jobs) multi-threaded kernels this small
    wait on each other's preempted threads: two threads measured 6x slower than one. One thread
    also makes the trained weights independent of the machine's core count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_tiny_lm(
    output_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = 480,
    n_layer: int = 4,
    d_model: int = 64,
    n_head: int = 4,
    n_positions: int = 128,
    vocab_size: int = 768,
    batch_size: int = 8,
    learning_rate: float = 8e-3,
    n_documents: int = 8000,
    n_heldout: int = 300,
) -> Path:
    """Train a GPT-2 on :func:`generate_corpus` and save it, its tokenizer and its corpus to ``output_dir``.

    Args:
        output_dir: created if missing; receives ``save_pretrained`` files for model and tokenizer,
            :data:`TRAIN_FILE`, :data:`HELDOUT_FILE` and, last, :data:`METRICS_FILE`.
        seed: seeds the corpus, the initial weights and the batch order; same seed, same model.
        steps: AdamW steps of ``batch_size`` chunks of ``n_positions`` tokens each.
        n_layer, d_model, n_head, n_positions: the GPT-2 shape.
        vocab_size: BPE vocabulary size, eos included.
        learning_rate: peak rate of a linear warmup (first 10% of steps) then cosine decay to 10%.
        n_documents: training documents generated (more than ``steps`` consumes, so batches rarely repeat).
        n_heldout: documents generated after the training ones, minus any that also occur in training.

    Returns:
        ``output_dir`` as a Path.
    """
    with _one_thread():
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        documents = generate_corpus(n_documents + n_heldout, seed)
        train_docs = documents[:n_documents]
        seen = set(train_docs)
        heldout_docs = [doc for doc in documents[n_documents:] if doc not in seen]

        tokenizer = train_tokenizer(train_docs, vocab_size)
        tokenizer.model_max_length = n_positions
        train_chunks = pack(tokenizer, train_docs, n_positions)
        heldout_chunks = pack(tokenizer, heldout_docs, n_positions)

        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=n_positions,
            n_embd=d_model,
            n_layer=n_layer,
            n_head=n_head,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
            # Dropout only slows a few hundred steps of training on an endless synthetic corpus.
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = GPT2LMHeadModel(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
        warmup = max(1, steps // 10)

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, steps - warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        order = torch.randperm(len(train_chunks), generator=torch.Generator().manual_seed(seed))
        initial_loss = mean_loss(model, heldout_chunks)
        logger.info("tiny LM: %d params, held-out loss at start %.3f", model.num_parameters(), initial_loss)

        model.train()
        start = time.perf_counter()
        recent: list[float] = []
        for step in range(steps):
            index = order[(torch.arange(batch_size) + step * batch_size) % len(order)]
            batch = train_chunks[index]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            recent = [*recent[-9:], loss.item()]
            if step % 50 == 0:
                logger.debug("step %d loss %.3f", step, loss.item())
        seconds = time.perf_counter() - start

        metrics = {
            "seed": seed,
            "steps": steps,
            "train_seconds": round(seconds, 2),
            "initial_heldout_loss": initial_loss,
            "final_train_loss": sum(recent) / len(recent),
            "heldout_loss": mean_loss(model, heldout_chunks),
            "heldout_unigram_entropy": unigram_entropy(heldout_chunks, len(tokenizer)),
            "log_vocab": math.log(len(tokenizer)),
            "n_train_tokens_seen": steps * batch_size * n_positions,
        }
        logger.info(
            "tiny LM trained in %.1fs: held-out loss %.3f -> %.3f (unigram entropy %.3f, ln vocab %.3f)",
            seconds,
            initial_loss,
            metrics["heldout_loss"],
            metrics["heldout_unigram_entropy"],
            metrics["log_vocab"],
        )

        model.eval()
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        _write_documents(output_dir / TRAIN_FILE, train_docs)
        _write_documents(output_dir / HELDOUT_FILE, heldout_docs)
        (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        return output_dir


class TinyLM(NamedTuple):
    """A trained tiny LM loaded from the directory :func:`train_tiny_lm` wrote."""

    model: PreTrainedModel
    """GPT-2 in eval mode, float32."""
    tokenizer: PreTrainedTokenizerFast
    """Byte-level BPE; ``<|endoftext|>`` is eos, bos and pad."""
    directory: Path
    """Where it was loaded from: ``from_pretrained`` works on it."""
    train_text_path: Path
    """Training documents, separated by blank lines (see :func:`read_documents`)."""
    heldout_text_path: Path
    """Held-out documents, none of which occurs in the training file."""


def load_tiny_lm(directory: str | Path) -> TinyLM:
    """Load what :func:`train_tiny_lm` saved in ``directory``; each call returns a fresh model."""
    directory = Path(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return TinyLM(model, tokenizer, directory, directory / TRAIN_FILE, directory / HELDOUT_FILE)
