"""Tests for lenslab.data (text sources, packing, held-out split, bytes per token) and lenslab.cli.common."""

from __future__ import annotations

import argparse
import copy
import json
import math
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

from lenslab.cli.flags import MODEL, TEXT
from lenslab.data import (
    DEFAULT_CONFIG,
    DEFAULT_DATASET,
    MAX_SEQ_LEN,
    DataSpec,
    TokenData,
    default_seq_len,
    iter_texts,
    prepare_tokens,
    sample_texts,
)
from lenslab.errors import LensLabError
from lenslab.loading import DTYPES
from lenslab.specs import DTYPE_CHOICES

EOS = "<|endoftext|>"
# Distinct documents with numbered markers at both ends (to find which document a chunk came from) and some
# multi-byte characters (so that bytes and characters differ).
DOCS = [
    f"start{i:03d} the quick brown fox {'jumps over ' * (i % 4)}the lazy dog, café №{i} end{i:03d}" for i in range(60)
]


def build_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on DOCS (any text encodes); with `bos`, it puts <s> before every text, like Llama."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=[EOS, "<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(DOCS, trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token="<s>")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread than on several (and much faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": doc, "id": i}) + "\n" for i, doc in enumerate(DOCS)))
    return path


def reference_streams(docs, tokenizer, heldout_need, train_need):
    """Plain packing: whole documents + EOS, the first ones to the held-out stream until it holds enough."""
    heldout, train = [], []
    for doc in docs:
        if len(heldout) < heldout_need:
            heldout += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        elif len(train) < train_need:
            train += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return heldout, train


def chunked(stream, need, body, prefix=()):
    return [list(prefix) + stream[i : i + body] for i in range(0, need, body)]


# --- sources -------------------------------------------------------------------------------------------------------


def test_txt_documents_are_blank_line_separated_paragraphs(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("First paragraph,\nstill the first.\n\nSecond one.\n\n\n\nThird, after extra blank lines.\n")
    assert list(iter_texts(DataSpec(str(path)))) == [
        "First paragraph,\nstill the first.",
        "Second one.",
        "Third, after extra blank lines.",
    ]


def test_jsonl_with_custom_column_skips_null_and_empty(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"body": "alpha", "n": 1}, {"body": None, "n": 2}, {"body": "", "n": 3}, {"body": "  beta\n", "n": 4}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert list(iter_texts(DataSpec(str(path), text_column="body"))) == ["alpha", "  beta\n"]
    with pytest.raises(LensLabError, match=r"columns \['body', 'n'\] but no 'text'; pass --text-column"):
        list(iter_texts(DataSpec(str(path))))


def test_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"content": ["one", "two", "three"], "score": [0.1, 0.2, 0.3]}), path)
    assert list(iter_texts(DataSpec(str(path), text_column="content"))) == ["one", "two", "three"]


def test_directory_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("b1\n\nb2\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "a1"}) + "\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "c1"}) + "\n")
    pq.write_table(pa.table({"text": ["s1", "s2"]}), tmp_path / "sub" / "d.parquet")
    (tmp_path / "README.md").write_text("not data")
    assert list(iter_texts(DataSpec(str(tmp_path)))) == ["a1", "b1", "b2", "c1", "s1", "s2"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", "holds no text"),
        ("blank.txt", "\n\n  \n\n", "holds no text"),
        ("empty.jsonl", "", "holds no text"),
        ("notes.md", "text", "suffix '.md'"),
    ],
)
def test_empty_or_unreadable_files_raise(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(LensLabError, match=re.escape(message)):
        list(iter_texts(DataSpec(str(tmp_path / name))))


def test_missing_paths_and_empty_directories_raise(tmp_path):
    with pytest.raises(LensLabError, match="does not exist"):
        list(iter_texts(DataSpec(str(tmp_path / "missing.jsonl"))))
    with pytest.raises(LensLabError, match="does not exist"):
        list(iter_texts(DataSpec("./no/such/dir")))
    with pytest.raises(LensLabError, match=r"holds no \.txt"):
        list(iter_texts(DataSpec(str(tmp_path))))


class FakeLoadDataset:
    """Stands in for `datasets.load_dataset` (no network here): records the call, streams rows lazily."""

    def __init__(self, rows):
        self.rows, self.calls, self.pulled = rows, [], 0

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        for row in self.rows:
            self.pulled += 1
            yield row


def test_hub_dataset_is_streamed_with_config_and_split(monkeypatch):
    fake = FakeLoadDataset([{"content": "hello"}, {"content": "world"}])
    monkeypatch.setattr(datasets, "load_dataset", fake)
    spec = DataSpec("someone/corpus", config="en", split="validation", text_column="content")
    assert list(iter_texts(spec)) == ["hello", "world"]
    assert fake.calls == [{"path": "someone/corpus", "name": "en", "split": "validation", "streaming": True}]


def test_no_data_streams_the_default_dataset(monkeypatch):
    fake = FakeLoadDataset([{"text": "web page"}])
    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert list(iter_texts(DataSpec())) == ["web page"]
    assert fake.calls == [{"path": DEFAULT_DATASET, "name": DEFAULT_CONFIG, "split": "train", "streaming": True}]


def test_hub_errors_become_lenslab_errors(monkeypatch):
    def unreachable(**kwargs):
        raise ConnectionError("Couldn't reach the hub\nmore details")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(LensLabError, match=r"Could not read --data org/set \(train\) \(Couldn't reach the hub\)"):
        list(iter_texts(DataSpec("org/set")))


def test_big_sources_are_read_only_as_far_as_needed(monkeypatch, tokenizer):
    fake = FakeLoadDataset([{"text": doc} for doc in DOCS * 1000])
    monkeypatch.setattr(datasets, "load_dataset", fake)
    data = prepare_tokens(DataSpec("big/corpus"), tokenizer, train_tokens=64, heldout_tokens=32, seq_len=16)
    assert data.train.shape == (4, 16) and data.heldout.shape == (2, 16)
    assert fake.pulled <= data.train_documents + data.heldout_documents + 64  # at most one tokenizer batch more


# --- self-sampling -------------------------------------------------------------------------------------------------


def record_generate(monkeypatch, model):
    calls = []
    generate = model.generate

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", recording)
    return calls


def test_self_sampling_is_seeded_pure_sampling_from_eos(monkeypatch, model, tokenizer):
    calls = record_generate(monkeypatch, model)
    rng_state = torch.random.get_rng_state()
    first = list(zip(range(12), sample_texts(model, tokenizer, seed=1, batch_size=4, max_new_tokens=12)))
    again = list(zip(range(12), sample_texts(model, tokenizer, seed=1, batch_size=4, max_new_tokens=12)))
    other = list(zip(range(12), sample_texts(model, tokenizer, seed=2, batch_size=4, max_new_tokens=12)))
    assert first == again and first != other
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the caller's RNG is untouched
    (prompt,), kwargs = calls[0]
    assert prompt.tolist() == [[tokenizer.eos_token_id]] * 4
    config = kwargs["generation_config"]
    assert (config.do_sample, config.temperature, config.top_k, config.top_p) == (True, 1.0, 0, 1.0)
    assert config.max_new_tokens == 12


def test_self_sampling_starts_chat_models_at_the_assistant_turn(monkeypatch, model, tokenizer):
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = (
        "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|bot|>{% endif %}"
    )
    calls = record_generate(monkeypatch, model)
    next(sample_texts(model, chat_tokenizer, batch_size=2, max_new_tokens=4))
    expected = tokenizer("<|user|><|bot|>", add_special_tokens=False)["input_ids"]
    assert calls[0][0][0].tolist() == [expected] * 2


def test_self_sampling_gives_up_on_empty_samples(monkeypatch, model, tokenizer):
    eos = tokenizer.eos_token_id

    def only_eos(prompt, **kwargs):
        return torch.cat([prompt, torch.full_like(prompt, eos)], dim=1)

    monkeypatch.setattr(model, "generate", only_eos)
    with pytest.raises(LensLabError, match="empty texts in a row; pass --data a dataset"):
        next(sample_texts(model, tokenizer, batch_size=3))


def test_prepare_tokens_from_self(monkeypatch, model, tokenizer):
    calls = record_generate(monkeypatch, model)
    data = prepare_tokens(DataSpec("self"), tokenizer, model=model, train_tokens=96, heldout_tokens=32, seq_len=32)
    assert data.train.shape == (3, 32) and data.heldout.shape == (1, 32)
    assert len(calls) == 1  # one batch of samples holds enough text: sampling stops there
    assert data.source == "self-sampled text" and data.bytes_per_token > 0
    with pytest.raises(LensLabError, match="needs the model"):
        prepare_tokens(DataSpec("self"), tokenizer, train_tokens=96, heldout_tokens=32, seq_len=32)


# --- packing -------------------------------------------------------------------------------------------------------


def test_packing_matches_plain_reference(jsonl, tokenizer):
    data = prepare_tokens(DataSpec(str(jsonl)), tokenizer, train_tokens=150, heldout_tokens=40, seq_len=16)
    assert data.train.shape == (10, 16) and data.heldout.shape == (3, 16)  # ceil(tokens / seq_len) chunks
    assert data.train.dtype == data.heldout.dtype == torch.int64
    heldout, train = reference_streams(DOCS, tokenizer, 48, 160)
    assert data.heldout.tolist() == chunked(heldout, 48, 16)  # held-out keeps source order
    assert sorted(data.train.tolist()) == sorted(chunked(train, 160, 16))  # training chunks are shuffled
    assert data.train.tolist() != chunked(train, 160, 16)
    # Documents are joined by EOS.
    assert tokenizer.decode(data.heldout.flatten()).startswith(f"{DOCS[0]}{EOS}{DOCS[1]}{EOS}")


def test_bos_tokenizers_start_every_chunk_with_bos(jsonl):
    tokenizer = build_tokenizer(bos=True)
    bos = tokenizer.bos_token_id
    data = prepare_tokens(DataSpec(str(jsonl)), tokenizer, train_tokens=64, heldout_tokens=32, seq_len=16)
    heldout, train = reference_streams(DOCS, tokenizer, 2 * 15, 4 * 15)
    assert data.heldout.tolist() == chunked(heldout, 30, 15, prefix=[bos])
    assert sorted(data.train.tolist()) == sorted(chunked(train, 60, 15, prefix=[bos]))


def test_heldout_documents_never_reach_training(jsonl, tokenizer):
    data = prepare_tokens(DataSpec(str(jsonl)), tokenizer, train_tokens=400, heldout_tokens=100, seq_len=16)

    def markers(chunks):
        return {int(n) for chunk in chunks for n in re.findall(r"(?:start|end)(\d{3})", tokenizer.decode(chunk))}

    heldout, train = markers(data.heldout), markers(data.train)
    assert heldout and train and not heldout & train
    assert max(heldout) < min(train)  # the held-out part is the first documents


def test_seed_shuffles_training_only_and_heldout_is_stable(jsonl, tokenizer):
    def prepare(seed, train_tokens=160):
        return prepare_tokens(
            DataSpec(str(jsonl)), tokenizer, train_tokens=train_tokens, heldout_tokens=48, seq_len=16, seed=seed
        )

    first, again, other = prepare(0), prepare(0), prepare(1)
    assert torch.equal(first.train, again.train) and torch.equal(first.heldout, again.heldout)
    assert not torch.equal(first.train, other.train)
    assert sorted(first.train.tolist()) == sorted(other.train.tolist())
    # The same held-out text whatever the seed or the training size, so a later evaluation cannot see training text.
    assert torch.equal(first.heldout, other.heldout) and torch.equal(first.heldout, prepare(3, train_tokens=0).heldout)
    assert prepare(3, train_tokens=0).train.shape == (0, 16)


def test_bytes_per_token_matches_reference(jsonl, tokenizer):
    data = prepare_tokens(DataSpec(str(jsonl)), tokenizer, train_tokens=100, heldout_tokens=50, seq_len=16)
    used = DOCS[: data.heldout_documents + data.train_documents]
    n_bytes = sum(len(doc.encode("utf-8")) for doc in used)
    n_tokens = sum(len(tokenizer(doc, add_special_tokens=False)["input_ids"]) for doc in used)
    assert n_bytes > sum(len(doc) for doc in used)  # multi-byte characters are counted as bytes
    assert data.bytes_per_token == pytest.approx(n_bytes / n_tokens)
    assert data.nats_to_bits_per_byte == pytest.approx(n_tokens / (n_bytes * math.log(2)))


def test_too_little_data_says_how_much_there_is(jsonl, tokenizer):
    heldout, train = reference_streams(DOCS, tokenizer, 16, 10**9)
    usable = min(len(heldout), 16) + len(train)
    with pytest.raises(LensLabError) as error:
        prepare_tokens(DataSpec(str(jsonl)), tokenizer, train_tokens=10_000, heldout_tokens=16, seq_len=16)
    message = str(error.value)
    assert f"supplied {usable:,} usable tokens in {len(DOCS)} documents but 10,016 are needed" in message
    assert "--train-tokens 10,000" in message and "--heldout-tokens 16" in message


def test_bad_token_counts_and_seq_len(jsonl, model, tokenizer):
    spec = DataSpec(str(jsonl))
    with pytest.raises(LensLabError, match="pass positive --train-tokens or --heldout-tokens"):
        prepare_tokens(spec, tokenizer, train_tokens=0, heldout_tokens=0)
    with pytest.raises(LensLabError, match="--seq-len 65 cannot be used; pass at least 2 and at most the model's"):
        prepare_tokens(spec, tokenizer, model=model, train_tokens=10, heldout_tokens=10, seq_len=65)
    with pytest.raises(LensLabError, match="--seq-len 1 cannot be used; pass at least 2"):
        prepare_tokens(spec, tokenizer, train_tokens=10, heldout_tokens=10, seq_len=1)


def test_default_seq_len(model, tokenizer):
    assert default_seq_len(model, tokenizer) == 64  # the model's n_positions
    assert default_seq_len(None, tokenizer) == MAX_SEQ_LEN  # the tokenizer declares no limit (~1e30)
    short = copy.deepcopy(tokenizer)
    short.model_max_length = 40
    assert default_seq_len(model, short) == 40


def test_shard_gives_each_rank_an_equal_disjoint_share():
    data = TokenData(
        train=torch.arange(10).view(10, 1), heldout=torch.arange(4).view(4, 1), seq_len=1, bytes_per_token=4.0,
        source="test",
    )  # fmt: skip
    shards = [data.shard(rank, 3) for rank in range(3)]
    assert [shard.train.flatten().tolist() for shard in shards] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert [shard.heldout.flatten().tolist() for shard in shards] == [[0], [1], [2]]
    with pytest.raises(LensLabError, match="rank 3 is outside 0..2"):
        data.shard(3, 3)
    with pytest.raises(LensLabError, match="4 chunks cannot be shared by 5 processes; raise --heldout-tokens"):
        data.shard(0, 5)


# --- CLI flags -----------------------------------------------------------------------------------------------------


def test_cli_flags_build_the_data_spec():
    parser = argparse.ArgumentParser()
    MODEL.add_to(parser)
    TEXT.add_to(parser)
    args = parser.parse_args(["--model", "m"])
    assert TEXT.build(args).source() == DataSpec()
    assert (args.dtype, args.device, args.revision, args.trust_remote_code) == ("auto", "auto", None, False)
    assert (args.seq_len, args.seed) == (None, 0)
    args = parser.parse_args(
        ["--model", "m", "--data", "org/set", "--data-config", "c", "--split", "test", "--text-column", "body",
         "--seq-len", "128", "--seed", "7", "--dtype", "bfloat16"]
    )  # fmt: skip
    assert TEXT.build(args).source() == DataSpec("org/set", config="c", split="test", text_column="body")
    assert (args.seq_len, args.seed, args.dtype) == (128, 7, "bfloat16")
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--seq-len", "0"])
    assert set(DTYPE_CHOICES) == {"auto", *DTYPES}  # the choices cannot drift from what load_model accepts
