"""Regenerate every picture of `docs/gallery.md` from a real trained model, with the library's own plotting code.

    python docs/gallery/make_gallery.py --shared ../shared            # about 4 minutes on a 2-core CPU

Reads the model `austen-gpt2-6l` and the text `austen.txt` of the developers' shared folder (`--shared`, see its
README; users of lenslab do not have it), trains two small tuned lenses (the fast recipe's closed-form start
with 1 and with 8 steps), and writes into this folder:

- `eval.png`, `eval-transfer.png`: `lenslab eval` with both lenses (and `--transfer`) on held-out text;
- `transfer.png`: `lenslab transfer`, the lens of the model on a copy fine-tuned for a few steps on *Persuasion*
  (`examples/persuasion.txt`), beside that copy's logit lens and its own tuned lens;
- `show.png`, `show-long.png`, `show-target.png`, `show.html`, `show-terminal.svg`: `lenslab show` of a short
  prompt (entropy), 56 held-out tokens through the tuned lens (rank, wrapped into
  bands), a target score, the interactive page
  and the terminal table with its legend;
- `depth.png`: `lenslab depth` with the tuned lens;
- `fidelity.png`: `lenslab cbe` with the tuned lens at three lens positions.

Everything is seeded; a rerun draws the same pictures up to floating-point noise.
"""

from __future__ import annotations

import argparse
import copy
import io
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from lenslab.adapter import ModelView
from lenslab.applications.depth import prediction_depth
from lenslab.applications.transfer import transfer_lenses
from lenslab.causal import ExtractionConfig
from lenslab.causal.report import causal_report
from lenslab.data import DataSpec, prepare_tokens
from lenslab.evaluate import evaluate_lenses, transfer_matrix
from lenslab.lenses import LogitLens, TunedLens
from lenslab.loading import load_model
from lenslab.plots import plot_curves, plot_transfer
from lenslab.plots.causal import plot_fidelity
from lenslab.plots.depth import plot_depth_histogram
from lenslab.plots.html import write_html
from lenslab.plots.png import write_png
from lenslab.plots.terminal import tables
from lenslab.report import WIDTH
from lenslab.train import TrainConfig, train_lens
from lenslab.trajectory import TrajectoryConfig, compute_trajectories, encode_prompt

GALLERY = Path(__file__).parent
REPOSITORY = GALLERY.parents[1]
SHORT_PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be"
TARGET_PROMPT = "Mr. Darcy looked at Elizabeth, and Miss Bingley said to her sister that"
SEQ_LEN = 256
BATCH_SIZE = 8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=REPOSITORY.parent / "shared", help="the shared folder")
    parser.add_argument("--output", type=Path, default=GALLERY, help="where to write (default: %(default)s)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    loaded = load_model(str(args.shared / "models" / "austen-gpt2-6l"), dtype="float32", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    view = ModelView.from_model(model)
    data = prepare_tokens(
        DataSpec(str(args.shared / "data" / "austen.txt")), tokenizer, train_tokens=2**15, heldout_tokens=2**12,
        seq_len=SEQ_LEN,
    )  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="lenslab-gallery-"))
    short = train(view, data.train, steps=1, directory=work / "closed-form")
    tuned = train(view, data.train, steps=8, directory=work / "trained")
    step(started, "trained the lenses")

    # lenslab eval --lens closed-form --lens trained --transfer: two tuned lenses, told apart by line style.
    lenses = {"logit": LogitLens(view), "closed-form": short, "trained": tuned}
    result = evaluate_lenses(view, lenses, data.heldout, batch_size=BATCH_SIZE,
                             bits_per_byte_factor=data.nats_to_bits_per_byte)  # fmt: skip
    for name in ("closed-form", "trained"):
        result.transfer[name] = transfer_matrix(view, lenses[name], data.heldout, batch_size=BATCH_SIZE)
    plot_curves(result, args.output / "eval.png")
    plot_transfer(result, args.output / "eval-transfer.png")
    step(started, "eval")

    transfer_figure(view, tokenizer, work / "trained", work, args.output)
    step(started, "transfer")

    show_figures(view, tokenizer, tuned, data.heldout, args.output)
    step(started, "show")

    depth = prediction_depth(view, tuned, data.heldout, batch_size=BATCH_SIZE)
    plot_depth_histogram(depth, args.output / "depth.png", model=model.config.name_or_path, lens_kind=tuned.kind)
    step(started, "depth")

    fidelity_figure(view, tuned, data.heldout[:8, :128], args.output)
    step(started, "cbe")


def train(view: ModelView, tokens: torch.Tensor, *, steps: int, directory: Path) -> TunedLens:
    """The fast recipe's closed-form start on 2^13 tokens, then ``steps`` steps of 2^10 tokens; saved, and loaded
    back as `lenslab eval --lens` would."""
    config = TrainConfig(steps=steps, tokens_per_step=2**10, init_tokens=2**13, batch_size=BATCH_SIZE)
    train_lens(view, tokens, config, output_dir=directory, progress=False)
    return TunedLens.load(directory, view)


def transfer_figure(view: ModelView, tokenizer, lens_dir: Path, work: Path, output: Path) -> None:
    """`lenslab transfer --lens LENS_DIR --own-lens ...` on a copy of the model fine-tuned for a few AdamW steps on
    *Persuasion*, a novel its training text already holds: a mild change, after which the base model's lens should
    score close to the copy's own."""
    persuasion = prepare_tokens(DataSpec(str(REPOSITORY / "examples" / "persuasion.txt")), tokenizer,
                                train_tokens=2**13, heldout_tokens=2**11, seq_len=SEQ_LEN)  # fmt: skip
    fine_tuned = copy.deepcopy(view.model).train().requires_grad_(True)  # training froze the original
    optimizer = torch.optim.AdamW(fine_tuned.parameters(), lr=1e-3)
    for batch in persuasion.train.split(BATCH_SIZE):
        fine_tuned(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    fine_tuned.eval().config.name_or_path = "austen-gpt2-6l, fine-tuned on Persuasion"
    fine_view = ModelView.from_model(fine_tuned)
    own_dir = work / "own-lens"
    train(fine_view, persuasion.train, steps=4, directory=own_dir)
    lenses, _ = transfer_lenses(fine_view, lens_dir, own_lens_dir=own_dir)
    result = evaluate_lenses(fine_view, lenses, persuasion.heldout, batch_size=BATCH_SIZE,
                             bits_per_byte_factor=persuasion.nats_to_bits_per_byte)  # fmt: skip
    plot_curves(result, output / "transfer.png")


def show_figures(view: ModelView, tokenizer, lens: TunedLens, heldout: torch.Tensor, output: Path) -> None:
    """`lenslab show` of a short prompt, a long held-out passage and a target score, as PNG, HTML and a terminal."""
    lenses = [LogitLens(view), lens]

    def trajectories(ids: torch.Tensor, config: TrajectoryConfig | None = None):
        return compute_trajectories(view, lenses, ids, tokenizer=tokenizer, config=config)

    short = trajectories(encode_prompt(tokenizer, SHORT_PROMPT))
    write_png(short, output / "show.png", "entropy")
    write_html(short, output / "show.html", "entropy")
    console = Console(record=True, width=WIDTH, color_system="truecolor", file=io.StringIO())
    for table in tables(short[:1], "entropy", width=console.width):
        console.print(table)
    console.save_svg(str(output / "show-terminal.svg"), title="lenslab show (logit lens, terminal)")
    long = compute_trajectories(view, [lens], heldout[1, :56], tokenizer=tokenizer)
    write_png(long, output / "show-long.png", "rank")
    ids = encode_prompt(tokenizer, TARGET_PROMPT)
    config = TrajectoryConfig(targets=(tokenizer.encode(" she")[0],), anti_targets=(tokenizer.encode(" he")[0],))
    write_png(trajectories(ids, config), output / "show-target.png", "target")


def fidelity_figure(view: ModelView, lens: TunedLens, ids: torch.Tensor, output: Path) -> None:
    """`lenslab cbe --lens ... --layers 0,2,4 --k 8` on ``ids`` (a small sample, to keep the run short)."""
    report = causal_report(view, lens, ids, [0, 2, 4], ExtractionConfig(k=8), batch_size=BATCH_SIZE)
    plot_fidelity(report.fidelities, report.alignments, output / "fidelity.png", model=view.model.config.name_or_path,
                  lens_kind=lens.kind)  # fmt: skip


def step(started: float, what: str) -> None:
    print(f"{time.perf_counter() - started:6.1f} s  {what}", flush=True)


if __name__ == "__main__":
    main()
