"""How tokens are shown: the tokenizer's own decoding, made exact for one token and visible.

Decoding a single token with ``tokenizer.decode([id])`` is almost right, with two exceptions this
module repairs:

- a token that holds part of a multi-byte UTF-8 character (byte-level BPE's ``ä¸``, SentencePiece's
  byte fallback ``<0xE4>``) decodes to U+FFFD; its bytes are recovered and shown as ``\\xe4``;
- SentencePiece decoders strip the leading space of the text (``▁the`` decodes to ``the``), so the
  metaspace is put back.

``visible`` then makes whitespace and control characters visible for pictures: ``␣the``, ``↵``.

>>> visible(" the\\n")
'␣the↵'
>>> visible("a\\x00b")
'a\\\\x00b'
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache

from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from lenslab.errors import LensLabError

METASPACE = "\u2581"
"""SentencePiece's word-boundary marker ``▁``."""

WHITESPACE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}
"""Whitespace -> the visible symbol that stands for it (␣ ↵ ⇥ ␍)."""

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-in character -> the byte it encodes (``Ġ`` -> 0x20)."""
    return {char: byte for byte, char in bytes_to_unicode().items()}


def _token_bytes(token: str) -> bytes | None:
    """The raw bytes a vocabulary entry stands for, when it is byte-encoded; None otherwise."""
    fallback = _BYTE_FALLBACK.fullmatch(token)
    if fallback:
        return bytes([int(fallback.group(1), 16)])
    alphabet = _byte_level_alphabet()
    if token and all(char in alphabet for char in token):
        return bytes(alphabet[char] for char in token)
    return None


def token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """The text of one token: what the tokenizer decodes it to, with partial UTF-8 bytes as ``\\xe4``."""
    text = tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
    token = tokenizer.convert_ids_to_tokens(token_id)
    if "\ufffd" in text and token is not None:
        raw = _token_bytes(token)
        if raw is not None:
            text = raw.decode("utf-8", errors="backslashreplace")
    if token is not None and token.startswith(METASPACE) and not text.startswith(" "):
        text = " " + text
    return text


def token_texts(tokenizer: PreTrainedTokenizerBase | None, token_ids: set[int]) -> dict[int, str]:
    """``token_text`` for each id; without a tokenizer the ids themselves, as ``#123``."""
    if tokenizer is None:
        return {i: f"#{i}" for i in token_ids}
    return {i: token_text(tokenizer, i) for i in token_ids}


def visible(text: str) -> str:
    """Whitespace as ␣ ↵ ⇥ ␍ and other control characters as ``\\xNN`` escapes, for display."""
    return "".join(
        WHITESPACE.get(char)
        or (char.encode("unicode_escape").decode("ascii") if unicodedata.category(char) == "Cc" else char)
        for char in text
    )


def single_token_id(tokenizer: PreTrainedTokenizerBase, text: str, flag: str) -> int:
    """The id of the one token that ``text`` encodes to, or a LensLabError naming ``flag``.

    Leading spaces matter in most vocabularies: ``" Paris"`` and ``"Paris"`` are different tokens.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tokenizer.convert_ids_to_tokens(i) for i in ids]
        raise LensLabError(
            f"{flag} {text!r} is {len(ids)} tokens {pieces} but a single token was expected; pass one token "
            f"to {flag} (mind the leading space, as in {flag} ' Paris')."
        )
    return ids[0]
