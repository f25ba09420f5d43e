"""What each command reads and writes beyond the model, the text and the lenses (`lenslab.specs`): one dataclass per
command. Torch-free, like `lenslab.specs`, so that the command line builds its flags from them without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lenslab.errors import LensLabError
from lenslab.specs import HELDOUT_TOKENS, check_lens_references

Units = Literal["bits-per-byte", "nats"]
LensKind = Literal["tuned", "linear", "jacobian"]
LensLayout = Literal["lenslab", "jacobian-lens", "tuned-lens"]
"""`lenslab convert --to` values, `lenslab.convert.LAYOUTS`."""
Stat = Literal["entropy", "prob", "rank", "kl", "target"]
"""Names of `lenslab.trajectory.STATISTIC_NAMES`, repeated here so that `--help` does not import torch."""
CAUSAL_FILES = ("bases.safetensors", "summary.json", "fidelity.png")
"""What `lenslab cbe` writes into its output folder: the bases, the report as JSON, the fidelity figure."""
CAUSAL_SEQ_LEN = 256
"""`lenslab cbe`'s longest sequence when --seq-len is not given: many short sequences give resample ablation many
partners and the sample more documents."""


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
