"""The files a subcommand will write, checked before any model loads, so that a path that cannot or must not be
written stops the run with one sentence (exit status 2) instead of a crash, or a lost result, after the work.

A path must have one of the subcommand's suffixes, must not be a folder, must lie in a writable folder (created if
missing, under no file), and, if a file is already there, must hold an output of the same kind that lenslab wrote,
recognised by its content:

- `.json`: a top-level `"written_by": "lenslab COMMAND VERSION"` (`mark`) of the same subcommand;
- `.png`: a "Software" text chunk starting "lenslab " (`lenslab.io.GENERATOR`), which every lenslab figure has;
- `.html`: a `<meta name="generator" content="lenslab ...">` tag, which every lenslab page has;
- `.jsonl`: a first record with "prompt", "choices" and "label", as `lenslab make-attacks` writes;
- `.safetensors`: metadata with "layers", as `lenslab cbe` writes its bases.

Anything else (a README, a photo, another program's JSON) is left alone. Kept free of heavy imports: the command
line checks its outputs before torch loads.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

from lenslab import __version__
from lenslab.errors import LensLabError

MARK_KEY = "written_by"
"""Top-level key of every JSON output, naming the lenslab subcommand that wrote it."""
_HEAD_BYTES = 4096
"""Bytes read from the start of an existing PNG or HTML file to recognise it."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def mark(command: str) -> dict[str, str]:
    """The entry a JSON output of `command` carries so that a later run recognises it, and may replace it."""
    return {MARK_KEY: f"lenslab {command} {__version__}"}


def check_output(path: Path, flag: str, suffixes: Sequence[str], command: str) -> None:
    """Raise LensLabError unless lenslab `command` may write `path` (given by `flag`): see the module's docstring."""
    if path.is_dir():
        example = path / f"results{suffixes[0]}"
        raise LensLabError(f"{flag} {path} is a folder; pass a file in it, such as {example}.")
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise LensLabError(
            f"{flag} {path} has extension {suffix or '(none)'!r}; pass a file ending in {' or '.join(suffixes)}."
        )
    folder = next(parent for parent in path.absolute().parents if parent.exists())
    if not folder.is_dir():
        raise LensLabError(f"{flag} {path} cannot be written: {folder} is a file, not a folder; pass another path.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LensLabError(f"{flag} {path} cannot be written: {folder} is not writable; pass a writable folder.")
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_file() or not _RECOGNISERS[suffix](path, command):
        raise LensLabError(
            f"{flag} {path} already exists and is not a {suffix} file lenslab {command} wrote, so it is left alone; "
            f"pass another path, or move that file away first."
        )
    if not os.access(path, os.W_OK):
        raise LensLabError(f"{flag} {path} is read-only; make it writable, or pass another path.")


def _head(path: Path) -> bytes:
    with open(path, "rb") as file:
        return file.read(_HEAD_BYTES)


def _is_json_of(path: Path, command: str) -> bool:
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, OSError):  # ValueError covers JSONDecodeError and UnicodeDecodeError
        return False
    written_by = value.get(MARK_KEY) if isinstance(value, dict) else None
    return isinstance(written_by, str) and written_by.split()[:2] == ["lenslab", command]


def _is_lenslab_png(path: Path, command: str) -> bool:
    head = _head(path)
    return head.startswith(PNG_SIGNATURE) and b"tEXtSoftware\x00lenslab " in head


def _is_lenslab_page(path: Path, command: str) -> bool:
    return b'<meta name="generator" content="lenslab ' in _head(path)


def _is_attack_set(path: Path, command: str) -> bool:
    try:
        with open(path, encoding="utf-8") as file:
            first = next((line for line in file if line.strip()), "")
        record = json.loads(first)
    except (ValueError, OSError):
        return False
    return isinstance(record, dict) and {"prompt", "choices", "label"} <= set(record)


def _is_bases_file(path: Path, command: str) -> bool:
    """A safetensors file (8-byte little-endian header length, then a JSON header) whose metadata has "layers"."""
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(min(length, 1 << 24)))
    except (ValueError, OSError, struct.error):
        return False
    return isinstance(header, dict) and "layers" in (header.get("__metadata__") or {})


_RECOGNISERS: dict[str, Callable[[Path, str], bool]] = {
    ".json": _is_json_of,
    ".png": _is_lenslab_png,
    ".html": _is_lenslab_page,
    ".jsonl": _is_attack_set,
    ".safetensors": _is_bases_file,
}
"""Suffix -> whether an existing file of it is an output lenslab `command` wrote, which it may replace."""
