"""Benchmark lens training: tokens per second, peak memory and the held-out KL reached for a token budget.

    python benchmarks/train_speed.py                                   # lenslab's recipes alone
    python benchmarks/train_speed.py --tuned-lens-python /work/tl-venv/bin/python --output results.json
    python benchmarks/train_speed.py --memory-batch-sizes 4,16         # peak memory against micro-batch size

Trains a tuned lens on a fixed small model (default: the 6-layer Austen GPT-2 in /work/shared) with lenslab's
`train_lens`, once per recipe in `--recipes`, and, when `--tuned-lens-python` points at a Python with `tuned-lens`
0.2.0 installed, with tuned-lens's own training loop on the same model, text and settings. Each trainer runs in a
fresh subprocess, so that its peak memory is its own: on CPU the growth of the process's resident set size from
the start of training to its peak (see `PeakMemory`), on GPU `torch.cuda.max_memory_allocated`. Only
training is timed, not loading the model or tokenizing; for the fast recipe the closed-form start is part of it.
Two speeds are reported: "steps" counts the tokens of the optimiser steps over the steps' time, "run" adds the
tokens the closed-form start read and its time. All lenses are then scored here, by `lenslab.evaluate`, on held-out
text that none trained on: the mean KL(p_final || p_lens) over lens positions 0..L-1, next to the logit lens's.

`--memory-batch-sizes` also runs one step of each lenslab recipe per micro-batch size (a step of one micro-batch)
and reports how the peak grows per token of micro-batch, in units of one layer's float32 logits per token
(4 x vocabulary bytes): about 1 means O(one layer's logits), about L would mean every layer's logits at once.

Setting up the tuned-lens side (a separate venv, since it needs transformers 4):
    python3 -m venv /work/tl-venv && /work/tl-venv/bin/pip install torch==2.13.0 tuned-lens==0.2.0 \
        torchdata==0.9.0 transformers==4.57.6 "datasets<5"

This file is also the worker each subprocess runs (`--worker lenslab|tuned-lens`), which is why it imports
lenslab and tuned-lens only inside the functions that need them: the tuned-lens venv has no lenslab.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
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
    parser.add_argument(
        "--recipes", default="fast,paper",
        help="lenslab recipes to run, comma-separated; RECIPE+torch-kl runs it with the chunked KL on PyTorch "
        "operations instead of the compiled kernel (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=8, help="optimiser steps (default: %(default)s)")
    parser.add_argument(
        "--init-tokens", type=int, default=None,
        help="tokens of the fast recipe's closed-form start (default: the recipe's, capped by the data)",
    )  # fmt: skip
    parser.add_argument(
        "--memory-batch-sizes", default=None, metavar="B1,B2",
        help="also measure one step's peak memory at these micro-batch sizes (sequences), e.g. 4,16",
    )  # fmt: skip
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
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # "tuned-lens" or "lenslab:RECIPE"
    parser.add_argument("--lens-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--train-jsonl", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def status_mib(field: str) -> float:
    """A size from /proc/self/status (Linux), e.g. VmRSS (resident now) or VmHWM (resident at peak), in MiB."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) / 1024


class PeakMemory:
    """Peak memory that a block of code adds: CUDA's allocator peak on GPU, resident-set growth on CPU.

    On CPU (tracemalloc cannot see torch's allocations) the heap's free memory is first returned to the system
    (glibc's malloc_trim) and the kernel's peak-RSS mark reset (/proc/self/clear_refs), so the peak measured is
    this block's, not that of loading the model before it.
    """

    def __init__(self, device: str):
        import torch

        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated() / 2**20
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size
            self.start = status_mib("VmRSS")

    def mib(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.start
        return status_mib("VmHWM") - self.start


def lenslab_worker(args: argparse.Namespace) -> dict:
    """Train with `lenslab.train.train_lens` on the training split `prepare_tokens` makes, with the recipe named
    after the worker's colon."""
    import torch

    from lenslab.adapter import ModelView
    from lenslab.data import DataSpec, prepare_tokens
    from lenslab.loading import load_model
    from lenslab.train import TrainConfig, train_lens
    from lenslab.train.native_kl import DISABLE_VARIABLE

    recipe, _, variant = args.worker.split(":")[1].partition("+")
    if variant == "torch-kl":
        os.environ[DISABLE_VARIABLE] = "0"  # read when the kernel is first needed, after this
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype="float32", device=args.device)
    data = prepare_tokens(
        DataSpec(args.data), tokenizer, train_tokens=args.steps * args.tokens_per_step,
        heldout_tokens=args.heldout_tokens, seq_len=args.seq_len, seed=0,
    )  # fmt: skip
    view = ModelView.from_model(model)
    config = TrainConfig(
        recipe=recipe, steps=args.steps, tokens_per_step=args.tokens_per_step, batch_size=args.batch_size,
        init_tokens=args.init_tokens if recipe == "fast" else None,
    )  # fmt: skip
    memory = PeakMemory(args.device)
    started = time.perf_counter()
    result = train_lens(view, data.train, config, output_dir=args.lens_dir, progress=False, overwrite=True)
    seconds = time.perf_counter() - started
    step_seconds = sum(record.tokens / record.step / record.tokens_per_second for record in result.history)
    return {
        "seconds": seconds, "step_seconds": step_seconds, "tokens": result.history[-1].tokens,
        "init_tokens": result.init_tokens, "peak_memory_mib": memory.mib(), "vocab": view.vocab_size,
        "layers": view.num_layers,
    }  # fmt: skip


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
    return {
        "seconds": seconds, "step_seconds": seconds, "tokens": args.steps * args.tokens_per_step, "init_tokens": 0,
        "peak_memory_mib": marks["memory"].mib(),
    }  # fmt: skip


def run_worker(
    python: Path | str, name: str, args: argparse.Namespace, lens_dir: Path, train_jsonl: Path, **overrides
) -> dict:
    """Run one trainer in a fresh process and return its result, with tokens per second added.

    `overrides` replace settings for this worker alone, e.g. steps=1, batch_size=4.
    """
    settings = {key: getattr(args, key) for key in ("steps", "tokens_per_step", "batch_size")} | overrides
    command = [
        str(python), __file__, "--worker", name, "--lens-dir", str(lens_dir), "--train-jsonl", str(train_jsonl),
        "--model", args.model, "--data", args.data, "--steps", str(settings["steps"]),
        "--tokens-per-step", str(settings["tokens_per_step"]), "--seq-len", str(args.seq_len),
        "--batch-size", str(settings["batch_size"]), "--heldout-tokens", str(args.heldout_tokens),
        "--device", args.device, "--threads", str(args.threads),
        "--tuned-lens-tokenizer-type", args.tuned_lens_tokenizer_type,
    ]  # fmt: skip
    if args.init_tokens is not None:
        command += ["--init-tokens", str(args.init_tokens)]
    print(f"training with {name} ...", file=sys.stderr, flush=True)
    completed = subprocess.run(command, capture_output=True, text=True, check=False)  # failures reported below
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        sys.exit(f"{name} worker failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    result = json.loads(lines[-1].removeprefix(RESULT_PREFIX))
    return result | {
        "tokens_per_second": result["tokens"] / result["step_seconds"],
        "run_tokens_per_second": (result["tokens"] + result["init_tokens"]) / result["seconds"],
    }


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


def memory_scaling(args: argparse.Namespace, scratch: Path, recipes: list[str]) -> dict[str, dict]:
    """One step of one micro-batch per size in `--memory-batch-sizes`, per recipe: peak MiB per size, and the
    growth per token of micro-batch in units of one layer's float32 logits per token."""
    sizes = [int(size) for size in args.memory_batch_sizes.split(",")]
    scaling = {}
    for recipe in recipes:
        peaks, vocab = {}, None
        for size in sizes:
            run = run_worker(
                sys.executable, f"lenslab:{recipe}", args, scratch / f"memory-{recipe}-{size}", scratch / "none",
                steps=1, tokens_per_step=size * args.seq_len, batch_size=size,
            )  # fmt: skip
            peaks[size], vocab = run["peak_memory_mib"], run["vocab"]
        tokens = (sizes[-1] - sizes[0]) * args.seq_len
        logits_mib = tokens * vocab * 4 / 2**20  # one layer's float32 logits for the added tokens
        growth = (peaks[sizes[-1]] - peaks[sizes[0]]) / logits_mib
        scaling[recipe] = {"peak_mib": peaks, "growth_in_layer_logits": growth}
    return scaling


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker = tuned_lens_worker if args.worker == "tuned-lens" else lenslab_worker
        print(RESULT_PREFIX + json.dumps(worker(args)), flush=True)
        return

    recipes = args.recipes.split(",")
    with tempfile.TemporaryDirectory(prefix="train_speed_") as scratch:
        scratch = Path(scratch)
        train_jsonl = scratch / "train.jsonl"
        if args.tuned_lens_python:
            training_documents(args, train_jsonl)
        runs = {}
        for recipe in recipes:
            runs[f"lenslab {recipe}"] = run_worker(
                sys.executable, f"lenslab:{recipe}", args, scratch / f"lenslab {recipe}", train_jsonl
            )
        if args.tuned_lens_python:
            runs["tuned-lens"] = run_worker(
                args.tuned_lens_python, "tuned-lens", args, scratch / "tuned-lens", train_jsonl
            )
        kl = heldout_kl(args, {name: scratch / name for name in runs})
        scaling = memory_scaling(args, scratch, recipes) if args.memory_batch_sizes else {}

    print(f"\n{args.steps} steps x {args.tokens_per_step} tokens, seq_len {args.seq_len}, batch {args.batch_size}, "
          f"{args.device}, {args.threads} thread(s); held-out KL over {args.heldout_tokens} tokens")  # fmt: skip
    print(f"{'trainer':<14} {'init tok':>8} {'steps tok/s':>11} {'run tok/s':>9} {'peak MiB':>8} {'mean KL':>8}  "
          "KL per position 0..L-1 (nats)")  # fmt: skip
    for name, layers in kl.items():
        run = runs.get(name)
        speed = (
            f"{run['init_tokens']:8d} {run['tokens_per_second']:11.0f} {run['run_tokens_per_second']:9.0f} "
            f"{run['peak_memory_mib']:8.0f}" if run else " " * 39
        )  # fmt: skip
        print(f"{name:<14} {speed} {sum(layers) / len(layers):8.4f}  " + " ".join(f"{value:.4f}" for value in layers))
    if "tuned-lens" in runs:
        theirs = runs["tuned-lens"]
        for name in runs:
            if name != "tuned-lens":
                ours = runs[name]
                print(
                    f"{name} / tuned-lens: steps speed x{ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}, "
                    f"run speed x{ours['run_tokens_per_second'] / theirs['run_tokens_per_second']:.2f}, "
                    f"peak memory x{ours['peak_memory_mib'] / max(theirs['peak_memory_mib'], 1e-9):.2f}, "
                    f"mean held-out KL x{sum(kl[name]) / sum(kl['tuned-lens']):.3f}"
                )
    for recipe, result in scaling.items():
        peaks = ", ".join(f"batch {size}: {mib:.0f} MiB" for size, mib in result["peak_mib"].items())
        print(f"peak memory of one step, lenslab {recipe}: {peaks}; growth per micro-batch token = "
              f"{result['growth_in_layer_logits']:.2f} x one layer's float32 logits")  # fmt: skip
    if args.output:
        record = {
            "date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "settings": {key: str(value) for key, value in vars(args).items() if key not in INTERNAL_FLAGS},
            "runs": runs, "heldout_kl": kl, "memory_scaling": scaling,
        }  # fmt: skip
        args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
