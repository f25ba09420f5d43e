"""Plain file helpers: atomic writes and file hashes. Standard library only, so that any output code can use them
without loading torch or transformers.

Every file is written to a temporary name in the same directory and renamed into place, so a crash never leaves a
half-written file: a reader sees the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lenslab import __version__

GENERATOR = f"lenslab {__version__}"
"""How lenslab signs the pictures and pages it writes (a PNG's "Software" chunk, an HTML page's generator meta tag),
so that a later run recognises its own output and leaves everything else alone (`lenslab.outputs`)."""


@contextmanager
def staged_file(path: Path, write: Callable[[Path], None]) -> Iterator[Path]:
    """A temporary file beside `path` that `write(temporary_path)` has filled and that is on disk, for the caller
    to rename into place; it is removed if the caller does not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        # mkstemp creates owner-only files; give the result the permissions a plain open() would.
        os.chmod(temporary, 0o666 & ~_current_umask())
        yield Path(temporary)
    finally:
        Path(temporary).unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(temporary_path)`, then rename the result onto `path` in one step."""
    with staged_file(path, write) as temporary:
        os.replace(temporary, path)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON to `path` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def file_sha256(path: Path) -> str:
    """SHA-256 of the file at `path`, as 64 hex digits, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
