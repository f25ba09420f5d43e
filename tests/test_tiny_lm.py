"""The trained tiny LM that other tests rely on is really trained, reproducible and loadable."""

from __future__ import annotations

import math
import re

import torch
from safetensors.torch import load_file
from support.tiny_lm import (
    EOS,
    generate_corpus,
    mean_loss,
    pack,
    read_documents,
    train_tiny_lm,
    unigram_entropy,
)
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_model_is_trained(tiny_lm):
    documents = read_documents(tiny_lm.heldout_text_path)
    heldout = pack(tiny_lm.tokenizer, documents, tiny_lm.model.config.n_positions)[:64]  # 8k tokens: enough
    vocab_size = len(tiny_lm.tokenizer)
    loss = mean_loss(tiny_lm.model, heldout)
    assert loss < 0.6 * math.log(vocab_size)
    # Beating the unigram entropy means the model uses context, not just token frequencies.
    assert loss < unigram_entropy(heldout, vocab_size) - 1.0


def test_unigram_entropy_matches_plain_formula():
    chunks = torch.tensor([[0, 1, 1, 2], [2, 2, 2, 2]])
    p = torch.tensor([1, 2, 5]) / 8
    assert math.isclose(unigram_entropy(chunks, vocab_size=5), float(-(p * p.log()).sum()), rel_tol=1e-6)


def test_corpus_is_deterministic_by_seed():
    documents = generate_corpus(30, seed=0)
    assert documents == generate_corpus(30, seed=0)
    assert documents != generate_corpus(30, seed=1)
    assert all(doc.count(".") >= 4 and "\n" not in doc for doc in documents)


def test_facts_are_the_same_for_every_seed():
    capital_of: dict[str, set[str]] = {}
    for seed in range(3):
        for doc in generate_corpus(50, seed):
            for country, capital in re.findall(r"The capital of (\w+) is (\w+)\.", doc):
                capital_of.setdefault(country, set()).add(capital)
    assert len(capital_of) > 5
    assert all(len(capitals) == 1 for capitals in capital_of.values())


def test_saved_directory_loads_with_auto_classes(tiny_lm):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm.directory)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm.directory)
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == EOS
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head) == (4, 64, 4)
    text = "Text the corpus never held: naïve café, 42 — ok?"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    ids = tokenizer(read_documents(tiny_lm.heldout_text_path)[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_lm.model(ids).logits)


def test_heldout_documents_were_never_trained_on(tiny_lm):
    train = read_documents(tiny_lm.train_text_path)
    heldout = read_documents(tiny_lm.heldout_text_path)
    assert len(heldout) > 100 and len(train) > 10 * len(heldout)
    assert not set(train) & set(heldout)


def test_training_is_deterministic_by_seed(tmp_path):
    recipe = dict(steps=2, n_documents=60, n_heldout=10, vocab_size=300, batch_size=2)

    def weights(seed: int, name: str) -> dict[str, torch.Tensor]:
        return load_file(train_tiny_lm(tmp_path / name, seed=seed, **recipe) / "model.safetensors")

    threads = torch.get_num_threads()
    first, again, other = weights(0, "first"), weights(0, "again"), weights(1, "other")
    assert torch.get_num_threads() == threads  # training runs on one thread but gives the others back
    assert first.keys() == again.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["transformer.wte.weight"], other["transformer.wte.weight"])
