"""Flags that several subcommands share: which model to load and which text to read.

Kept free of heavy imports (torch, datasets) so that `lenslab --help` stays fast; the library modules are imported
when the parsed flags are used.

>>> import argparse
>>> parser = argparse.ArgumentParser()
>>> add_model_args(parser); add_data_args(parser)
>>> args = parser.parse_args(["--model", "gpt2", "--data", "wikitext"])
>>> data_spec_from_args(args)
DataSpec(source='wikitext', config=None, split='train', text_column='text')
"""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING, Any

from lenslab.errors import LensLabError

if TYPE_CHECKING:
    from lenslab.data import DataSpec
    from lenslab.loading import LoadedModel

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
"""`--dtype` values; "auto" is bfloat16 on GPUs that support it, float32 otherwise (see `lenslab.loading`)."""

DEVICE_MAP_CHOICES = ("auto", "balanced", "balanced_low_0", "sequential")
"""`--device-map` values: accelerate's strategies for spreading a model over the GPUs, then CPU memory, then disk."""

_MEMORY_SIZE = re.compile(r"\d+(\.\d+)?[KMG]i?B")
"""A size `--max-memory` passes on to accelerate as text: 20GiB, 500MB, 1.5GB."""


def positive_int(text: str) -> int:
    """argparse type for counts and lengths: an integer above zero (underscores allowed, e.g. 1_000_000)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above zero, got {value}")
    return value


def max_memory(text: str) -> dict[int | str, int | str]:
    """argparse type of `--max-memory`: "0=20GiB,1=40GiB,cpu=100GiB" -> {0: "20GiB", 1: "40GiB", "cpu": "100GiB"}.

    Devices are GPU numbers, cpu, mps or disk; a size is a number of bytes or a number with KB, MB, GB, KiB, MiB or
    GiB.
    """
    limits: dict[int | str, int | str] = {}
    for entry in text.split(","):
        device, _, size = (part.strip() for part in entry.partition("="))
        known_device = device.isdigit() or device in ("cpu", "mps", "disk")
        if not known_device or not (size.isdigit() or _MEMORY_SIZE.fullmatch(size)):
            raise argparse.ArgumentTypeError(
                f"expected DEVICE=SIZE pairs separated by commas, e.g. 0=20GiB,cpu=60GiB, got {entry!r}"
            )
        limits[int(device) if device.isdigit() else device] = int(size) if size.isdigit() else size
    return limits


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Add `--model`, `--dtype`, `--device`, `--revision`, `--trust-remote-code`, and `--device-map`, `--max-memory`
    and `--offload-folder` for models bigger than one device."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help="Hugging Face hub id or local directory of a causal LM")
    group.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="weights dtype (default: %(default)s)")
    group.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N, or auto = cuda when available (default: %(default)s)"
    )
    group.add_argument("--revision", default=None, help="model revision: branch, tag or commit on the hub")
    group.add_argument(
        "--trust-remote-code", action="store_true", help="allow the model's own code from the hub to run"
    )
    group.add_argument(
        "--device-map",
        default=None,
        choices=DEVICE_MAP_CHOICES,
        help="spread a model too big for one device over the GPUs, then CPU memory, then disk (needs accelerate); "
        "--device then does not move it",
    )
    group.add_argument(
        "--max-memory",
        type=max_memory,
        default=None,
        help="with --device-map: the most each device may hold, e.g. 0=20GiB,1=40GiB,cpu=100GiB",
    )
    group.add_argument(
        "--offload-folder",
        default=None,
        help="with --device-map: where to keep the weights it offloads to disk (needed unless they are safetensors)",
    )


def load_model_from_args(
    args: argparse.Namespace, *, model: str | None = None, revision: str | None = None, device: Any = None
) -> LoadedModel:
    """`lenslab.load_model` with the flags `add_model_args` added; `model`, `revision` and `device` replace
    `--model`, `--revision` and `--device` (e.g. for another checkpoint of the model, or a torchrun process's GPU)."""
    from lenslab.loading import load_model

    return load_model(
        model or args.model,
        dtype=args.dtype,
        device=device or args.device,
        revision=revision if model else args.revision,
        trust_remote_code=args.trust_remote_code,
        device_map=args.device_map,
        max_memory=args.max_memory,
        offload_folder=args.offload_folder,
    )


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Add `--data`, `--data-config`, `--split`, `--text-column`, `--seq-len` and `--seed`."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        default=None,
        type=data_source,
        help="a .txt (documents separated by blank lines), .jsonl, .json or .parquet file, a directory of them, "
        "a Hugging Face dataset name, or 'self' for text the model samples itself "
        "(default: a web-text dataset streamed from the hub, lenslab.data.DEFAULT_DATASET)",
    )
    group.add_argument("--data-config", default=None, help="configuration of the hub dataset given to --data")
    group.add_argument("--split", default="train", help="split of the hub dataset (default: %(default)s)")
    group.add_argument(
        "--text-column", default="text", help="field holding the text in jsonl/parquet/hub data (default: %(default)s)"
    )
    group.add_argument(
        "--seq-len",
        type=positive_int,
        default=None,
        help="tokens per chunk (default: 2048 or the model's context length, whichever is shorter)",
    )
    group.add_argument(
        "--seed", type=int, default=0, help="seed for shuffling and for --data self sampling (default: %(default)s)"
    )


def data_spec_from_args(args: argparse.Namespace) -> DataSpec:
    """The `DataSpec` named by the flags `add_data_args` added (`--seq-len` and `--seed` go to `prepare_tokens`)."""
    from lenslab.data import DataSpec

    return DataSpec(source=args.data, config=args.data_config, split=args.split, text_column=args.text_column)


def data_source(text: str) -> str:
    """argparse type of `--data`: a missing local file or directory is refused while parsing, before a model loads."""
    from lenslab.data import DataSpec

    try:
        DataSpec(source=text).check_local()
    except LensLabError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--data ")) from None
    return text
