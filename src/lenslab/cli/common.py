"""Flags that several subcommands share: which model to load and which text to read.

Kept free of heavy imports (torch, datasets) so that `lenslab --help` stays fast; the library modules are imported
when the parsed flags are used.

>>> import argparse
>>> parser = argparse.ArgumentParser()
>>> add_model_args(parser); add_data_args(parser)
>>> args = parser.parse_args(["--model", "gpt2", "--data", "notes.txt"])
>>> data_spec_from_args(args)
DataSpec(source='notes.txt', config=None, split='train', text_column='text')
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from lenslab.errors import LensLabError

if TYPE_CHECKING:
    from lenslab.data import DataSpec
    from lenslab.loading import LoadedModel

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
"""`--dtype` values; "auto" is bfloat16 on GPUs that support it, float32 otherwise (see `lenslab.loading`)."""


def positive_int(text: str) -> int:
    """argparse type for counts and lengths: an integer above zero (underscores allowed, e.g. 1_000_000)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above zero, got {value}")
    return value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Add `--model`, `--dtype`, `--device`, `--revision` and `--trust-remote-code`."""
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


def load_model_from_args(args: argparse.Namespace) -> LoadedModel:
    """`lenslab.load_model` with the flags `add_model_args` added."""
    from lenslab.loading import load_model

    return load_model(
        args.model,
        dtype=args.dtype,
        device=args.device,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
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
