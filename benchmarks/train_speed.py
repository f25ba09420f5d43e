"""Benchmark lens training: tokens per second, peak memory and the held-out KL reached for a token budget.

    python benchmarks/train_speed.py                                   # lenslab alone
    python benchmarks/train_speed.py --tuned-lens-python /work/tl-venv/bin/python --output results.json

Trains a tuned lens on a fixed small model (default: the 6-layer Austen GPT-2 in /work/shared) with lenslab's
`train_lens` and, when `--tuned-lens-python` points at a Python with `tuned-lens` 0.2.0 installed, with tuned-lens's
own training loop on the same model, text and settings. Each trainer runs in a fresh subprocess, so that its peak
memory is its own: on CPU the growth of the process's maximum resident set size during training (tracemalloc
cannot see torch's allocations), on GPU `torch.cuda.max_memory_allocated`. Only the training loop is timed, not
loading the model or tokenizing. Both lenses are then scored here, by `lenslab.evaluate`, on held-out text that
neither trained on: the mean KL(p_final || p_lens) over lens positions 0..L-1, next to the logit lens's.

Setting up the tuned-lens side (a separate venv, since it needs transformers 4):
    python3 -m venv /work/tl-venv && /work/tl-venv/bin/pip install torch==2.13.0 tuned-lens==0.2.0 \
        torchdata==0.9.0 transformers==4.57.6 "datasets<5"

This file is also the worker each subprocess runs (`--worker lenslab|tuned-lens`), which is why it imports
lenslab and tuned-lens only inside the functions that need them: the tuned-lens venv has no lenslab.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

INTERNAL_FLAGS = ("worker", "lens_dir", "train_jsonl")
"""Flags the main process passes to its workers, not settings of the benchmark."""
RESULT_PREFIX = "RESULT "
"""Workers print their result as one JSON line after this prefix (tuned-lens prints much else on stdout)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="/work/shared/models/austen-gpt2-6l", help="local model directory")
    parser.add_argument(
        "--data", default="/work/shared/data/austen.txt", help="text file, documents separated by blank lines"
    )
    parser.add_argument("--steps", type=int, default=8, help="optimiser steps (default: %(default)s)")
    parser.add_argument("--tokens-per-step", type=int, default=2**12, help="(default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="sequences per forward pass, both trainers (default: %(default)s)"
    )
    parser.add_argument(
        "--heldout-tokens", type=int, default=2**13, help="tokens scored for the KL (default: %(default)s)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads per trainer, to leave cores to others (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--tuned-lens-python", type=Path, default=None, help="a Python with tuned-lens 0.2.0 installed")
    parser.add_argument(
        "--tuned-lens-tokenizer-type", default="gpt2",
        help="model type whose tokenizer class transformers 4 uses to read the tokenizer (transformers 5 saves a "
        "class name, TokenizersBackend, that transformers 4 lacks; default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", choices=("lenslab", "tuned-lens"), help=argparse.SUPPRESS)
    parser.add_argument("--lens-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--train-jsonl", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def max_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Peak memory that a block of code adds: CUDA's allocator peak on GPU, max-RSS growth on CPU."""

    def __init__(self, device: str):
        import torch

        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated() / 2**20
        else:
            self.start = max_rss_mib()

    def mib(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.start
        return max_rss_mib() - self.start


def lenslab_worker(args: argparse.Namespace) -> dict:
    """Train with `lenslab.train.train_lens` on the training split `prepare_tokens` makes."""
    import torch

    from lenslab.adapter import ModelView
    from lenslab.data import DataSpec, prepare_tokens
    from lenslab.loading import load_model
    from lenslab.train import TrainConfig, train_lens

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype="float32", device=args.device)
    data = prepare_tokens(
        DataSpec(args.data), tokenizer, train_tokens=args.steps * args.tokens_per_step,
        heldout_tokens=args.heldout_tokens, seq_len=args.seq_len, seed=0,
    )  # fmt: skip
    view = ModelView.from_model(model)
    config = TrainConfig(steps=args.steps, tokens_per_step=args.tokens_per_step, batch_size=args.batch_size)
    memory = PeakMemory(args.device)
    started = time.perf_counter()
    result = train_lens(view, data.train, config, output_dir=args.lens_dir, progress=False, overwrite=True)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": result.history[-1].tokens, "peak_memory_mib": memory.mib()}


def tuned_lens_worker(args: argparse.Namespace) -> dict:
    """Train with tuned-lens 0.2.0's own loop (`tuned_lens.scripts.train_loop.Train`), timed from after its setup."""
    import torch
    from tuned_lens.scripts import ingredients
    from tuned_lens.scripts.train_loop import Train

    torch.set_num_threads(args.threads)
    marks: dict = {}

    class TimedTrain(Train):
        def setup(self):
            state = super().setup()  # loads the model, tokenizes the data, builds the optimiser
            marks["memory"] = PeakMemory(args.device)
            marks["started"] = time.perf_counter()
            return state

    train = TimedTrain(
        model=ingredients.Model(name=args.model, precision="float32", tokenizer_type=args.tuned_lens_tokenizer_type),
        data=ingredients.Data(name=[str(args.train_jsonl)], max_length=args.seq_len),
        opt=ingredients.Optimizer(),
        dist=ingredients.Distributed(per_gpu_batch_size=args.batch_size),
        output=args.lens_dir,
        num_steps=args.steps,
        tokens_per_step=args.tokens_per_step,
        seed=0,
    )
    train.execute()
    seconds = time.perf_counter() - marks["started"]
    return {"seconds": seconds, "tokens": args.steps * args.tokens_per_step, "peak_memory_mib": marks["memory"].mib()}


def run_worker(python: Path | str, name: str, args: argparse.Namespace, lens_dir: Path, train_jsonl: Path) -> dict:
    """Run one trainer in a fresh process and return its result, with tokens per second added."""
    command = [
        str(python), __file__, "--worker", name, "--lens-dir", str(lens_dir), "--train-jsonl", str(train_jsonl),
        "--model", args.model, "--data", args.data, "--steps", str(args.steps),
        "--tokens-per-step", str(args.tokens_per_step), "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size), "--heldout-tokens", str(args.heldout_tokens),
        "--device", args.device, "--threads", str(args.threads),
        "--tuned-lens-tokenizer-type", args.tuned_lens_tokenizer_type,
    ]  # fmt: skip
    print(f"training with {name} ...", file=sys.stderr, flush=True)
    completed = subprocess.run(command, capture_output=True, text=True, check=False)  # failures reported below
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        sys.exit(f"{name} worker failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    result = json.loads(lines[-1].removeprefix(RESULT_PREFIX))
    return result | {"tokens_per_second": result["tokens"] / result["seconds"]}


def training_documents(args: argparse.Namespace, path: Path) -> None:
    """Write the documents after the held-out ones, as JSONL for tuned-lens, with a margin over what lenslab reads.

    tuned-lens drops the last partial chunk of every batch of documents it tokenizes, so it gets more text than
    the budget needs; its loop stops after `--steps` steps either way.
    """
    from transformers import AutoTokenizer

    from lenslab.data import DataSpec, iter_texts, prepare_tokens

    spec = DataSpec(args.data)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = prepare_tokens(
        spec, tokenizer, train_tokens=args.steps * args.tokens_per_step, heldout_tokens=args.heldout_tokens,
        seq_len=args.seq_len, seed=0,
    )  # fmt: skip
    documents = iter_texts(spec)
    wanted = data.heldout_documents + 2 * data.train_documents + 1000
    with open(path, "w") as file:
        for index, text in enumerate(documents):
            if index >= wanted:
                break
            if index >= data.heldout_documents:
                file.write(json.dumps({"text": text}) + "\n")
    documents.close()


def heldout_kl(args: argparse.Namespace, lens_dirs: dict[str, Path]) -> dict[str, list[float]]:
    """Per-position KL(p_final || p_lens) on the held-out tokens for the logit lens and each trained lens."""
    import torch

    from lenslab.adapter import ModelView
    from lenslab.data import DataSpec, prepare_tokens
    from lenslab.evaluate import evaluate_lenses
    from lenslab.lenses import LogitLens, TunedLens
    from lenslab.loading import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype="float32", device=args.device)
    view = ModelView.from_model(model)
    data = prepare_tokens(
        DataSpec(args.data), tokenizer, train_tokens=0, heldout_tokens=args.heldout_tokens, seq_len=args.seq_len
    )
    lenses = {"logit lens": LogitLens(view)} | {name: TunedLens.load(path, view) for name, path in lens_dirs.items()}
    result = evaluate_lenses(view, lenses, data.heldout, batch_size=args.batch_size)
    return {name: metrics.kl[: view.num_layers] for name, metrics in result.lenses.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker = lenslab_worker if args.worker == "lenslab" else tuned_lens_worker
        print(RESULT_PREFIX + json.dumps(worker(args)), flush=True)
        return

    with tempfile.TemporaryDirectory(prefix="train_speed_") as scratch:
        scratch = Path(scratch)
        train_jsonl = scratch / "train.jsonl"
        if args.tuned_lens_python:
            training_documents(args, train_jsonl)
        runs = {"lenslab": run_worker(sys.executable, "lenslab", args, scratch / "lenslab", train_jsonl)}
        if args.tuned_lens_python:
            runs["tuned-lens"] = run_worker(
                args.tuned_lens_python, "tuned-lens", args, scratch / "tuned-lens", train_jsonl
            )
        kl = heldout_kl(args, {name: scratch / name for name in runs})

    print(f"\n{args.steps} steps x {args.tokens_per_step} tokens, seq_len {args.seq_len}, batch {args.batch_size}, "
          f"{args.device}, {args.threads} thread(s); held-out KL over {args.heldout_tokens} tokens")  # fmt: skip
    print(f"{'trainer':<12} {'tokens/s':>10} {'peak MiB':>10} {'mean KL':>9}  KL per position 0..L-1 (nats)")
    for name, layers in kl.items():
        run = runs.get(name, {})
        speed = f"{run['tokens_per_second']:10.0f} {run['peak_memory_mib']:10.0f}" if run else f"{'':>10} {'':>10}"
        print(f"{name:<12} {speed} {sum(layers) / len(layers):9.4f}  " + " ".join(f"{value:.3f}" for value in layers))
    if "tuned-lens" in runs:
        ours, theirs = runs["lenslab"], runs["tuned-lens"]
        print(
            f"lenslab / tuned-lens: speed x{ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}, "
            f"peak memory x{ours['peak_memory_mib'] / max(theirs['peak_memory_mib'], 1e-9):.2f}, "
            f"mean held-out KL x{sum(kl['lenslab']) / sum(kl['tuned-lens']):.3f}"
        )
    if args.output:
        record = {
            "date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "settings": {key: str(value) for key, value in vars(args).items() if key not in INTERNAL_FLAGS},
            "runs": runs, "heldout_kl": kl,
        }  # fmt: skip
        args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
