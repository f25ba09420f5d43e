"""What a run reads, one dataclass per concern: the model, the text and the lenses (each command's own inputs and
outputs are `lenslab.command_specs`). Torch-free, so that the command line can build its flags from them
(`lenslab.cli.flags` reads each field's type, default and docstring) without loading torch; the loading itself is
imported when used.

>>> ModelSpec("gpt2").dtype, TextSpec(data="wikitext").source()
('auto', DataSpec(source='wikitext', config=None, split='train', text_column='text'))
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from lenslab.errors import LensLabError

if TYPE_CHECKING:
    from lenslab.adapter import ModelView
    from lenslab.data import DataSpec, TokenData
    from lenslab.lenses import Lens
    from lenslab.loading import LoadedModel

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPE_CHOICES = get_args(Dtype)
"""`--dtype` values; "auto" is bfloat16 on GPUs that support it, float32 otherwise (see `lenslab.loading`)."""
DeviceMap = Literal["auto", "balanced", "balanced_low_0", "sequential"]
HELDOUT_TOKENS = 65536
"""Tokens at the start of the data that training leaves out and evaluation scores, unless told otherwise."""
_MEMORY_SIZE = re.compile(r"\d+(\.\d+)?[KMG]i?B")
"""A size `--max-memory` passes on to accelerate as text: 20GiB, 500MB, 1.5GB."""


def positive_int(text: str) -> int:
    """A count or length from the command line: an integer above zero (underscores allowed, e.g. 1_000_000)."""
    value = whole_number(text)
    if value <= 0:
        raise ValueError(f"expected a number above zero, got {value}")
    return value


def whole_number(text: str) -> int:
    """A token count that may be zero."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise ValueError(f"expected 0 or more, got {value}")
    return value


def max_memory(text: str) -> dict[int | str, int | str]:
    """`--max-memory` "0=20GiB,1=40GiB,cpu=100GiB" -> {0: "20GiB", 1: "40GiB", "cpu": "100GiB"}.

    Devices are GPU numbers, cpu, mps or disk; a size is a number of bytes or a number with KB, MB, GB, KiB, MiB or
    GiB.
    """
    limits: dict[int | str, int | str] = {}
    for entry in text.split(","):
        device, _, size = (part.strip() for part in entry.partition("="))
        known_device = device.isdigit() or device in ("cpu", "mps", "disk")
        if not known_device or not (size.isdigit() or _MEMORY_SIZE.fullmatch(size)):
            raise ValueError(f"expected DEVICE=SIZE pairs separated by commas, e.g. 0=20GiB,cpu=60GiB, got {entry!r}")
        limits[int(device) if device.isdigit() else device] = int(size) if size.isdigit() else size
    return limits


def data_source(text: str) -> str:
    """`--data`: a missing local file or directory is refused while parsing, before a model loads."""
    from lenslab.data import DataSpec

    try:
        DataSpec(source=text).check_local()
    except LensLabError as error:
        raise ValueError(str(error).removeprefix("--data ")) from None
    return text


def positions(text: str) -> slice:
    """`--positions` "START:END" (either part may be empty or negative) -> slice(START, END)."""
    start, separator, end = text.partition(":")
    try:
        if not separator:
            raise ValueError
        return slice(int(start) if start.strip() else None, int(end) if end.strip() else None)
    except ValueError:
        raise ValueError(f"{text!r} is not START:END; pass e.g. --positions 0:50 or --positions 100:") from None


def check_lens_references(lenses: list[str]) -> None:
    """Refuse a misspelt hub lens reference (`lenslab.hub`) while the flags are read, before a model loads."""
    from lenslab import hub

    for lens in lenses:
        if hub.is_reference(lens):
            hub.parse(str(lens))


def fetch_hub_lenses(lenses: list[str], model: str) -> None:
    """Download the hub lenses among `lenses` for `model` (its hub id or path) before the model loads, so that one the
    hub lacks is refused at once; loading them later reads the hub's cache."""
    from lenslab import hub

    for lens in lenses:
        if hub.is_reference(lens):
            hub.resolve(lens, model)


@dataclass
class ModelSpec:
    """Which model to load, and onto which devices (`lenslab.load_model`)."""

    model: str
    """Hugging Face hub id, local directory or .gguf file of a causal LM."""
    dtype: Dtype = "auto"
    """Weights dtype; auto is bfloat16 on GPUs that support it, float32 otherwise."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto = cuda when available."""
    revision: str | None = None
    """Model revision: branch, tag or commit on the hub. Default: the main branch."""
    trust_remote_code: bool = False
    """Allow the model's own code from the hub to run."""
    device_map: DeviceMap | None = None
    """Spread a model too big for one device over the GPUs, then CPU memory, then disk (needs accelerate); --device
    then does not move it. Default: the whole model on --device."""
    max_memory: dict | None = None
    """With --device-map: the most each device may hold, e.g. 0=20GiB,1=40GiB,cpu=100GiB. Default: what is free."""
    offload_folder: str | None = None
    """With --device-map: where to keep the weights it offloads to disk (needed unless they are safetensors).
    Default: none."""

    def load(self, *, model: str | None = None, revision: str | None = None, device: Any = None) -> LoadedModel:
        """The model and tokenizer; `model` (with its `revision`) and `device` replace this spec's, e.g. for another
        checkpoint of the model or a torchrun process's GPU."""
        from lenslab.loading import load_model

        return load_model(
            model or self.model, dtype=self.dtype, device=device or self.device,
            revision=revision if model else self.revision, trust_remote_code=self.trust_remote_code,
            device_map=self.device_map, max_memory=self.max_memory, offload_folder=self.offload_folder,
        )  # fmt: skip


@dataclass
class TextSpec:
    """Which text to read, and how to cut it into chunks (`lenslab.data`)."""

    data: str | None = None
    """A .txt (documents separated by blank lines), .jsonl, .json or .parquet file, a directory of them, a Hugging
    Face dataset name, or 'self' for text the model samples itself. Default: a web-text dataset streamed from the
    hub, lenslab.data.DEFAULT_DATASET."""
    data_config: str | None = None
    """Configuration of the hub dataset given to --data. Default: the dataset's own."""
    split: str = "train"
    """Split of the hub dataset."""
    text_column: str = "text"
    """Field holding the text in jsonl/parquet/hub data."""
    seq_len: int | None = None
    """Tokens per chunk. Default: 2048 or the model's context length, whichever is shorter."""
    seed: int = 0
    """Seed for shuffling, for --data self sampling and for the command's other random choices."""

    def source(self) -> DataSpec:
        from lenslab.data import DataSpec

        return DataSpec(source=self.data, config=self.data_config, split=self.split, text_column=self.text_column)

    def chunk_length(self, loaded: LoadedModel, longest: int | None = None) -> int:
        """`seq_len`, or else the model's context length, at most 2048 and `longest`."""
        from lenslab.data import default_seq_len

        return self.seq_len or min(default_seq_len(loaded.model, loaded.tokenizer), longest or 1 << 62)

    def tokens(self, loaded: LoadedModel, *, heldout: int, train: int = 0, seq_len: int | None = None) -> TokenData:
        """`heldout` tokens from the start of the text and `train` after them, in chunks of `seq_len` (default:
        `chunk_length`)."""
        from lenslab.data import prepare_tokens

        return prepare_tokens(
            self.source(), loaded.tokenizer, train_tokens=train, heldout_tokens=heldout,
            seq_len=seq_len or self.chunk_length(loaded), seed=self.seed, model=loaded.model,
        )  # fmt: skip


@dataclass
class LensSpec:
    """Which trained lenses to apply beside the logit lens."""

    lens: list[str] = field(default_factory=list)
    """A trained lens: a lens folder, a Jacobian-lens .pt file, 'hub' (the tuned-lens zoo's lens for --model),
    hub:MODEL_ID, or hf://OWNER/REPO[/SUBFOLDER][@REVISION]; repeat to compare several. Default: the logit lens
    alone."""
    allow_model_mismatch: bool = False
    """Apply lenses trained for another model of the same shape (e.g. the base of a fine-tune)."""

    def __post_init__(self) -> None:
        check_lens_references(self.lens)

    def fetch(self, model: ModelSpec) -> None:
        """Download the hub lenses before `model` loads (`fetch_hub_lenses`)."""
        fetch_hub_lenses(self.lens, model.model)

    def names(self) -> dict[str, str | Path]:
        """Each lens by name: its kind ("tuned", "jacobian"), or its folder's name where two share a kind (for a hub
        lens its folder's or repository's, "hub" for the zoo entry of --model), made unique with -2, -3... The same
        lens given twice is loaded once; "logit" is kept for the logit lens."""
        from lenslab import hub
        from lenslab.lens_files import lens_kind

        def identity(lens: str | Path) -> str | Path:
            return lens if hub.is_reference(lens) else Path(lens).resolve()

        def folder_name(lens: str | Path) -> str:
            return hub.parse(lens).short_name if hub.is_reference(lens) else Path(lens).resolve().name

        unique = list({identity(lens): lens for lens in self.lens}.values())
        kinds = [lens_kind(lens) for lens in unique]
        names: dict[str, str | Path] = {}
        for lens, kind in zip(unique, kinds):
            base = kind if kinds.count(kind) == 1 else (folder_name(lens) or "lens")
            name, suffix = base, 1
            while name in names or name == "logit":
                suffix += 1
                name = f"{base}-{suffix}"
            names[name] = lens
        return names

    def load(self, view: ModelView) -> dict[str, Lens]:
        """The logit lens, then every trained lens by name."""
        from lenslab.lens_files import load_lens
        from lenslab.lenses import LogitLens

        check = "shapes" if self.allow_model_mismatch else "full"
        trained = {name: load_lens(path, view, check=check) for name, path in self.names().items()}
        return {"logit": LogitLens(view), **trained}

    def pair(self, view: ModelView) -> dict[str, Lens]:
        """The logit lens and the trained lens, if any, for commands that take at most one."""
        if len(self.lens) > 1:
            raise LensLabError(f"--lens was given {len(self.lens)} times, but this command takes one; pass one.")
        return self.load(view)

    def one(self, view: ModelView) -> Lens:
        """The trained lens, or the logit lens without --lens, for commands that analyse one lens."""
        return list(self.pair(view).values())[-1]


@dataclass
class TransferSpec:
    """The lenses `lenslab transfer` compares on a fine-tuned model."""

    lens: str
    """Tuned lens trained on the base model: a folder, hub:BASE_MODEL_ID (the tuned-lens zoo's) or
    hf://OWNER/REPO[/SUBFOLDER][@REVISION]."""
    own_lens: str | None = None
    """Tuned lens trained on the fine-tuned --model, given as --lens is. Default: none."""

    def __post_init__(self) -> None:
        check_lens_references(self.references())

    def references(self) -> list[str]:
        return [self.lens, *([self.own_lens] if self.own_lens else [])]

    def fetch(self, model: ModelSpec) -> None:
        """Download the hub lenses before `model` loads (`fetch_hub_lenses`)."""
        fetch_hub_lenses(self.references(), model.model)
