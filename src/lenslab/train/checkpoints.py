"""What a training run keeps in its output directory, and what it finds there when it starts.

    DIR/config.json, DIR/params.safetensors   the finished lens (`TunedLens.save`), written last
    DIR/train_log.jsonl                        one JSON record per step (`StepRecord`)
    DIR/checkpoint/state.pt                    lens, optimiser state, RNG, step and history of the last checkpoint
    DIR/lenslab-run.json                       the paths above that the run owns (`RUN_PATHS`), written first
    DIR/.lenslab-train.lock                    locked while a run trains here; holds its process id

Every file is written atomically (`lenslab.io.atomic_write`), so a killed run leaves the previous good
checkpoint whole. Which batches come next is a function of (seed, step), so the step is the whole data position.

lenslab never replaces or deletes a file it did not write (`own_output`): a non-empty directory without the run
file is refused unless `overwrite`, and even then the run trains there only if none of its paths is taken by
another program's file (those are named); files at other paths are left alone. A run starting in a directory that
holds a lens or a checkpoint of a *different* configuration (its fingerprint: the settings that decide the lens,
the data and the model) refuses to touch it unless told to overwrite; one of the *same* configuration resumes from
the checkpoint, or returns the finished lens.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pickle
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from lenslab import __version__
from lenslab.adapter import ModelView
from lenslab.artifacts import CONFIG_FILE, FORMAT_NAME, PARAMS_BACKUP, PARAMS_FILE
from lenslab.compatibility import unembed_fingerprint
from lenslab.errors import LensLabError
from lenslab.io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
LOG_FILE = "train_log.jsonl"
CHECKPOINT_VERSION = 1
RUN_FILE = "lenslab-run.json"
LOCK_FILE = ".lenslab-train.lock"
RUN_PATHS = (CONFIG_FILE, PARAMS_FILE, PARAMS_BACKUP, LOG_FILE, CHECKPOINT_DIR, LOCK_FILE, RUN_FILE)
"""Everything a run writes in its output directory (the checkpoint folder as a whole), relative to it."""
_held: dict[Path, int] = {}
"""Output directories this process holds (`own_output`) -> how many `own_output` calls are inside one another."""


@dataclass
class Checkpoint:
    """The state of a run after `step` completed steps."""

    step: int
    """Steps completed; the next step to run."""
    fingerprint: dict[str, Any]
    """The run's fingerprint (`run_fingerprint`), JSON-normalised."""
    lens: dict[str, torch.Tensor]
    """The lens's state dict."""
    optimizer: dict[str, Any]
    """The optimiser's state dict (momentum buffers, Adam moments)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One `StepRecord` as a dict per completed step."""
    elapsed: float = 0.0
    """Seconds spent training so far."""
    rng: dict[str, Any] = field(default_factory=dict)
    """Torch's CPU and CUDA generator states (`capture_rng`)."""
    init_shrinkage: list[float] | None = None
    """The closed-form start's shrinkage per lens position (`TrainResult.init_shrinkage`), for the finished lens's
    metadata: a resumed run does not fit the start again."""


def run_fingerprint(view: ModelView, tokens: torch.Tensor, settings: dict[str, Any]) -> dict[str, Any]:
    """What decides a run's lens (JSON-ready): its `settings` (e.g. `TrainConfig.fingerprint()`), the data
    (tokens: [sequences, seq_len]) and the model."""
    data = np.ascontiguousarray(tokens.cpu().numpy())
    sample = unembed_fingerprint(view.unembedding_weight())["sample"]
    return normalise(
        {
            "config": settings,
            "data": {"shape": list(tokens.shape), "blake2b": hashlib.blake2b(data, digest_size=16).hexdigest()},
            "model": {
                "name": view.model.config.name_or_path or type(view.model).__name__,
                "dtype": str(view.dtype).removeprefix("torch."),
                "unembed_sample": [round(value, 6) for value in sample],
            },
        }
    )


def normalise(data: Any) -> Any:
    """`data` as it reads back from JSON (tuples become lists), so stored and fresh fingerprints compare equal."""
    return json.loads(json.dumps(data))


def capture_rng() -> dict[str, Any]:
    """Torch's global generator states, CPU and (if in use) CUDA."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def restore_rng(rng: dict[str, Any]) -> None:
    """Put back the generator states of `capture_rng` (CUDA's only on the same number of devices)."""
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(output_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write the checkpoint atomically, replacing the previous one only once the new one is complete."""
    path = output_dir / CHECKPOINT_DIR / STATE_FILE
    state = {"version": CHECKPOINT_VERSION, **asdict(checkpoint)}
    atomic_write(path, lambda temporary: torch.save(state, temporary))
    return path


def load_checkpoint(output_dir: Path) -> Checkpoint | None:
    """The checkpoint in `output_dir`, or None when there is none."""
    path = output_dir / CHECKPOINT_DIR / STATE_FILE
    if not path.is_file():
        return None
    try:
        # Tensors, numbers, strings and containers only: weights_only refuses anything that would run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise LensLabError(
            f"The checkpoint {path} cannot be read ({str(error).splitlines()[0]}); pass --overwrite to start over."
        ) from None
    if state.pop("version", None) != CHECKPOINT_VERSION:
        raise LensLabError(f"The checkpoint {path} has an unknown format; pass --overwrite to start over.")
    return Checkpoint(**state)


def remove_checkpoint(output_dir: Path) -> None:
    """Delete the checkpoint (once the finished lens is safely written), and its folder when nothing else is in it."""
    (output_dir / CHECKPOINT_DIR / STATE_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: whatever else is there, lenslab did not write
        (output_dir / CHECKPOINT_DIR).rmdir()


@contextlib.contextmanager
def own_output(output_dir: Path, *, overwrite: bool) -> Iterator[None]:
    """Hold `output_dir` for one training run: refuse it if it is another program's (see the module docstring) or
    another run holds it, mark it as a run's, and lock it until the block ends; re-entrant within a process."""
    key = output_dir.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    _check_owned(output_dir, overwrite)
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    # The run file comes before the lock, so that a second run never finds a lock in a folder not yet marked.
    if not (output_dir / RUN_FILE).is_file():
        atomic_write_json(output_dir / RUN_FILE, {"written_by": f"lenslab train {__version__}", "files": RUN_PATHS})
    with open(output_dir / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise LensLabError(
                f"{output_dir} is in use by another lenslab train run (process {holder}); wait for it to finish, "
                "or pass another --output."
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        _held[key] = 1
        try:
            yield
        except BaseException:
            # A run that failed before writing anything leaves the folder as it found it.
            if {path.name for path in output_dir.iterdir()} <= {RUN_FILE, LOCK_FILE}:
                for name in (RUN_FILE, LOCK_FILE):
                    (output_dir / name).unlink(missing_ok=True)
                if created:
                    output_dir.rmdir()
            raise
        finally:
            del _held[key]  # closing the file releases the lock


def _check_owned(output_dir: Path, overwrite: bool) -> None:
    """Raise unless training may write `output_dir`'s `RUN_PATHS`: every one that exists is the run's."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise LensLabError(f"--output {output_dir} is a file, not a folder; pass a folder.")
    owned = _owned_paths(output_dir)
    present = sorted(path.name for path in output_dir.iterdir())
    if owned is None and present and not overwrite:
        shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        raise LensLabError(
            f"{output_dir} is not empty ({shown}) and holds no lenslab training run; pass another --output, or "
            "--overwrite to train there beside those files, which are never replaced or deleted."
        )
    taken = [name for name in RUN_PATHS if name in present and name not in (owned or ())]
    if taken:
        raise LensLabError(
            f"{output_dir} holds {', '.join(taken)}, which lenslab train did not write and a run there would "
            "replace, so even --overwrite leaves them alone; move them away, or pass another --output."
        )


def _owned_paths(output_dir: Path) -> list[str] | None:
    """The paths the run file of `output_dir` says the run owns; `RUN_PATHS` for a lens that lenslab train saved
    before it wrote run files; None when the directory holds no run."""
    try:
        run = json.loads((output_dir / RUN_FILE).read_text())
    except (OSError, ValueError):  # ValueError covers JSONDecodeError and UnicodeDecodeError
        run = None
    if isinstance(run, dict) and str(run.get("written_by", "")).startswith("lenslab train"):
        return [name for name in run.get("files", []) if isinstance(name, str)]
    try:
        config = json.loads((output_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    trained = isinstance(config, dict) and config.get("format") == FORMAT_NAME
    return list(RUN_PATHS) if trained and "training" in (config.get("metadata") or {}) else None


def differences(stored: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the entries where two fingerprints differ, e.g. ["config.lr", "data.sha256"]."""
    names = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            names += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            names.append(f"{prefix}{key}")
    return names


def finished_lens_fingerprint(output_dir: Path) -> dict[str, Any] | None:
    """The training fingerprint of the lens saved in `output_dir` ({} if it has none), None if there is no lens.

    A `config.json` that is not a lenslab lens (a model directory, say) is never overwritten.
    """
    path = output_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raw = None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise LensLabError(
            f"{output_dir} holds a {CONFIG_FILE} that is not a lenslab lens, which training would overwrite; "
            "pass another --output."
        )
    return raw.get("metadata", {}).get("training", {})


class Start(NamedTuple):
    """Where a run starts, given what its output directory holds."""

    checkpoint: Checkpoint | None
    """The checkpoint to resume from, or None to start at step 0."""
    finished: bool
    """The directory already holds the lens this run would train: nothing to do."""


def claim_output(
    held: contextlib.ExitStack,
    output_dir: Path | None,
    fingerprint: dict[str, Any],
    *,
    owner: bool,
    resume: bool,
    overwrite: bool,
) -> Start:
    """Hold `output_dir` until `held` closes (`own_output`, on the process that writes: `owner`) and plan where the
    run starts in it (`plan_start`); without an output directory a run starts from scratch."""
    if output_dir is None:
        return Start(None, finished=False)
    if owner:
        held.enter_context(own_output(output_dir, overwrite=overwrite))
    return plan_start(output_dir, fingerprint, resume=resume, overwrite=overwrite)


def plan_start(output_dir: Path, fingerprint: dict[str, Any], *, resume: bool, overwrite: bool) -> Start:
    """Decide how to start in `output_dir`: resume a checkpoint, or return a finished lens, of this configuration
    (with `overwrite` too, unless `resume` is off); raise rather than replace another configuration's files unless
    `overwrite`."""
    lens_fingerprint = finished_lens_fingerprint(output_dir)  # raises for a directory that is not a lens's
    try:
        checkpoint = load_checkpoint(output_dir)
    except LensLabError:
        if not overwrite:
            raise
        checkpoint = None  # unreadable, and to be replaced
    current = normalise(fingerprint)
    held = []
    if lens_fingerprint is not None:
        held.append(("a finished lens", lens_fingerprint))
    if checkpoint is not None:
        held.append((f"a checkpoint at step {checkpoint.step}", checkpoint.fingerprint))
    if not overwrite:
        for what, stored in held:
            changed = differences(stored, current)
            if changed:
                raise LensLabError(
                    f"{output_dir} holds {what} of a run with a different configuration (differing in "
                    f"{', '.join(changed)}); pass --overwrite to replace it, or another --output."
                )
        if held and not resume:
            raise LensLabError(
                f"{output_dir} holds {held[0][0]} of this run and resuming is off; pass --overwrite to train from "
                "scratch, or drop --no-resume."
            )
    if resume and checkpoint is not None and not differences(checkpoint.fingerprint, current):
        log.info("Resuming from the checkpoint at step %d in %s", checkpoint.step, output_dir)
        return Start(checkpoint=checkpoint, finished=False)
    finished = resume and lens_fingerprint is not None and not differences(lens_fingerprint, current)
    return Start(checkpoint=None, finished=finished)


def write_log(output_dir: Path, records: list[dict[str, Any]]) -> None:
    """Replace the training log with `records` (a resumed run drops the steps after its checkpoint)."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    atomic_write(output_dir / LOG_FILE, lambda temporary: temporary.write_text(text))


def append_log(output_dir: Path, record: dict[str, Any]) -> None:
    """Add one step's record to the training log."""
    with open(output_dir / LOG_FILE, "a") as file:
        file.write(json.dumps(record) + "\n")


def read_log(output_dir: Path) -> list[dict[str, Any]]:
    """The records of the training log, [] when there is none."""
    path = output_dir / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
