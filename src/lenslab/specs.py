"""What a run reads and writes, one dataclass per concern: the model, the text, the lenses, and each command's
inputs and outputs. Torch-free, so that the command line can build its flags from them (`lenslab.cli.flags` reads
each field's type, default and docstring) without loading torch; the loading itself is imported when used.

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
Units = Literal["bits-per-byte", "nats"]
LensKind = Literal["tuned", "linear", "jacobian"]
LensLayout = Literal["lenslab", "jacobian-lens", "tuned-lens"]
"""`lenslab convert --to` values, `lenslab.convert.LAYOUTS`."""
Stat = Literal["entropy", "prob", "rank", "kl", "target"]
"""Names of `lenslab.trajectory.STATISTIC_NAMES`, repeated here so that `--help` does not import torch."""
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
class EvalSpec:
    """What `lenslab eval` and `lenslab transfer` score, and where they write it."""

    output: Path
    """Where to write the metrics (a .json file)."""
    plot: Path | None = None
    """Where to write the PNG of the per-layer curves. Default: FILE.png beside --output."""
    units: Units = "bits-per-byte"
    """Units of the table and the plots."""
    tokens: int = HELDOUT_TOKENS
    """Held-out tokens to score, from the start of the data, which training leaves out."""
    batch_size: int | None = None
    """Sequences per forward pass. Default: about 8192 tokens' worth."""
    transfer: bool = False
    """Also apply every translator at every layer (JSON key 'transfer' and a FILE-transfer.png heatmap)."""

    @property
    def plot_path(self) -> Path:
        return self.plot or self.output.with_suffix(".png")

    @property
    def transfer_path(self) -> Path:
        return self.plot_path.with_name(f"{self.plot_path.stem}-transfer.png")


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


@dataclass
class PushSpec:
    """The lens `lenslab push` publishes on the hub, where, and what its model card says."""

    lens: Path
    """The lens folder to publish (lenslab's layout, or tuned-lens's, whose params.pt is uploaded as safetensors)."""
    repo: str
    """The hub model repository to upload to, OWNER/NAME; created when missing."""
    evaluation: Path | None = None
    """The JSON `lenslab eval --output` wrote with this lens, for the card's per-layer table. Default: no table."""
    base_model: str | None = None
    """Hub id of the lens's model, for the card. Default: the model the lens records."""
    private: bool = False
    """Create the repository private (an existing one keeps its visibility)."""
    dry_run: bool = False
    """Upload nothing; write exactly the files that would be uploaded into --output."""
    output: Path | None = None
    """With --dry-run: the folder to write the files into."""

    def __post_init__(self) -> None:
        if self.dry_run != (self.output is not None):
            raise LensLabError("--dry-run and --output go together; pass both to only write the files, or neither.")


@dataclass
class DepthSpec:
    """What `lenslab depth` scores, and where it writes it."""

    output: Path
    """Where to write the depths (a .json file)."""
    plot: Path | None = None
    """Where to write the histogram PNG. Default: FILE.png beside --output."""
    tokens: int = 16384
    """Held-out tokens to score, from the start of the data."""
    batch_size: int | None = None
    """Sequences per forward pass. Default: about 4096 tokens' worth."""
    checkpoints: list[str] | None = None
    """The model's training checkpoints in training order (hub ids or directories, same tokenizer). Default: none."""
    checkpoint_revisions: list[str] | None = None
    """The checkpoints as hub revisions of --model in training order (e.g. Pythia's step1000 step2000 ...).
    Default: none."""

    def __post_init__(self) -> None:
        if self.checkpoints and self.checkpoint_revisions:
            raise LensLabError("--checkpoints and --checkpoint-revisions were both given; pass only one of them.")

    @property
    def plot_path(self) -> Path:
        return self.plot or self.output.with_suffix(".png")


CAUSAL_FILES = ("bases.safetensors", "summary.json", "fidelity.png")
"""What `lenslab cbe` writes into its output folder: the bases, the report as JSON, the fidelity figure."""
CAUSAL_SEQ_LEN = 256
"""`lenslab cbe`'s longest sequence when --seq-len is not given: many short sequences give resample ablation many
partners and the sample more documents."""


@dataclass
class CausalSpec:
    """What `lenslab cbe` samples and where it writes its files."""

    output: Path
    """Output directory."""
    layers: str = "all"
    """Lens positions to analyse: 'all' (0 .. num_layers - 1, where lenses differ from the model) or a
    comma-separated list; 0 is the embeddings, num_layers the last layer's output."""
    tokens: int = 4096
    """Residuals sampled per layer: the first N held-out tokens, whole sequences."""
    batch_size: int | None = None
    """Sequences per forward pass. Default: about 8192 tokens' worth."""

    @property
    def paths(self) -> tuple[Path, ...]:
        """The files of `CAUSAL_FILES` in the output folder."""
        return tuple(self.output / name for name in CAUSAL_FILES)


@dataclass
class ShowSpec:
    """The prompt `lenslab show` reads, what it colours, and where it writes the picture."""

    prompt: str | None = None
    """The prompt text (or use --prompt-file)."""
    prompt_file: Path | None = None
    """Read the prompt from a UTF-8 file (one final newline is dropped). Default: the PROMPT argument."""
    stat: Stat = "entropy"
    """What the colour shows: entropy, probability or rank of the true next token, KL to the model's output, or the
    target score."""
    target: list[str] = field(default_factory=list)
    """A single token whose log-probability --stat target shows; repeat for a set (mind leading spaces)."""
    anti_target: list[str] = field(default_factory=list)
    """A token whose log-probability is subtracted from the target's; repeatable."""
    output: Path | None = None
    """Write .html, .png or .json, by extension. Default: a table in the terminal."""

    def text(self) -> str:
        """The prompt from the PROMPT argument or --prompt-file (exactly one of them)."""
        if self.prompt is not None and self.prompt_file is not None:
            raise LensLabError("Both a PROMPT argument and --prompt-file were given; pass only one of them.")
        if self.prompt_file is None:
            if self.prompt is None:
                raise LensLabError("No prompt was given; pass the prompt text as an argument or --prompt-file FILE.")
            return self.prompt
        try:
            text = self.prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise LensLabError(
                f"Could not read --prompt-file {self.prompt_file} ({error}); pass a readable UTF-8 text file."
            ) from None
        return text.removesuffix("\n")  # editors end files with a newline that is not part of the prompt


@dataclass
class DetectSpec:
    """The prompts `lenslab detect` reads, how it scores them, and where it writes the report."""

    normal: Path
    """Normal prompts to fit the detectors on (.jsonl)."""
    test: Path
    """Test prompts, each labelled normal or anomalous (.jsonl)."""
    output: Path
    """Where to write the AUROC report (a .json file)."""
    features: Literal["both", "tuned", "logit"] | None = None
    """Trajectories to detect from. Default: both with --lens, else logit."""
    seed: int = 0
    """Seeds Isolation Forest and the bootstrap."""
    resamples: int = 1000
    """Bootstrap resamples for the 95% intervals."""
    batch_size: int = 16
    """Sequences per forward pass."""


@dataclass
class AttackFiles:
    """The files `lenslab make-attacks` reads and writes."""

    input: Path
    """Multiple-choice records (.jsonl)."""
    output: Path
    """Where to write them, labelled (.jsonl)."""


@dataclass
class TrainSpec:
    """Where `lenslab train` writes, which tokens it reads, and what it may resume or replace."""

    output: Path
    """Directory for the lens, log and checkpoints."""
    kind: LensKind = "tuned"
    """The lens to make: tuned (affine translators trained to match the model), linear (the same translators fitted
    by least squares alone, Din et al. 2023: the fast recipe's start, no training step) or jacobian (the Jacobian
    lens of Gurnee et al. 2026, the mean Jacobian of the last layer's output to each layer's, fitted without
    training)."""
    train_tokens: int | None = None
    """Training tokens to read. Default: --steps x --tokens-per-step, so no text is read twice, or --init-tokens if
    that is more; for the linear lens 65536 (the fast recipe's --init-tokens); for the Jacobian lens 100 prompts
    of --seq-len tokens."""
    dim_batch: int = 32
    """Jacobian lens: copies of a prompt in one backward pass; more is faster and takes more memory, the lens is the
    same."""
    heldout_tokens: int = HELDOUT_TOKENS
    """Tokens at the start of the data kept out of training, for `lenslab eval`."""
    resume: bool = True
    """Continue from the checkpoint in --output when it holds one of this configuration."""
    overwrite: bool = False
    """Replace a lens or checkpoint of another configuration in --output."""


@dataclass
class ConvertSpec:
    """What `lenslab convert` reads, what it writes, and the model it may check the lens against."""

    lens: str
    """The lens to convert: a lenslab lens folder of any kind, a tuned-lens folder (config.json + params.pt), a
    Jacobian-lens .pt file (TransformerLens, anthropics/jacobian-lens), or a hub reference (hub, hub:MODEL, hf://...)."""
    to: LensLayout
    """The layout to write: lenslab (a lens folder), jacobian-lens (the .pt that TransformerLens's JacobianLens.load
    reads) or tuned-lens (the folder of the tuned-lens package)."""
    output: Path
    """Where to write it: a new or empty folder, or a .pt file for --to jacobian-lens."""
    model: str | None = None
    """The lens's model (hub id, folder or .gguf), loaded on the CPU, only to check the lens against it and to record
    its unembedding fingerprint (lenslab) or hash (tuned-lens), and the depth of a J-lens file that does not show
    it. Default: convert from the files alone."""
    allow_model_mismatch: bool = False
    """With --model: convert a lens made for another model of the same shape (e.g. the base of a fine-tune)."""

    def __post_init__(self) -> None:
        check_lens_references([self.lens])
