"""Wall time and total influence of the reference and the fast causal basis extraction, in one run.

    python benchmarks/cbe_speed.py --layer 3 --k 8 --tokens 4096 [--lens DIR] [--model M --data TEXT]

Both methods get the same residuals (the first --tokens held-out tokens of --data at lens position --layer), the
same ablation and the same k, and both go through `extract_basis`, whose time includes the final recomputation of
every direction's influence on the whole sample. *Total influence* is the sum of the k individual influences
(nats), each direction ablated alone. The fast method runs --fast-repeats times with different seeds (its result
is random); the table reports each run. Prints a markdown table row per run, ready for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

from lenslab.adapter import ModelView
from lenslab.causal import ExtractionConfig, capture_sample, extract_basis
from lenslab.data import DataSpec, prepare_tokens
from lenslab.lenses import LogitLens, TunedLens
from lenslab.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/work/shared/models/austen-gpt2-6l")
    parser.add_argument("--data", default="/work/shared/data/austen.txt")
    parser.add_argument("--lens", default=None, help="a tuned lens directory (default: the logit lens)")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ablation", default="mean", choices=("mean", "zero", "resample"))
    parser.add_argument("--fast-repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, device=args.device, dtype="float32")
    view = ModelView.from_model(model)
    lens = TunedLens.load(args.lens, view) if args.lens else LogitLens(view)
    data = prepare_tokens(
        DataSpec(args.data), tokenizer, train_tokens=0, heldout_tokens=args.tokens, seq_len=args.seq_len
    )
    residuals = capture_sample(view, data.heldout, [args.layer])[args.layer]
    n_tokens = residuals.shape[0] * residuals.shape[1]

    def run(method: str, seed: int = 0):
        config = ExtractionConfig(k=args.k, method=method, ablation=args.ablation, seed=seed)
        start = time.perf_counter()
        basis = extract_basis(lens, residuals, args.layer, config)
        return time.perf_counter() - start, basis

    reference_seconds, reference = run("reference")
    machine = (
        f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if args.device != "cpu":
        machine = f"{torch.cuda.get_device_name()} ({machine})"
    date = datetime.date.today().isoformat()
    lens_name = f"tuned ({args.lens})" if args.lens else "logit"
    model_name = os.path.basename(args.model.rstrip("/"))
    head = f"| {date} | {machine} | {model_name}, {lens_name} | {args.layer} | {args.k} | {n_tokens} | {args.ablation}"
    print(
        "| date | machine | model, lens | layer | k | N | ablation | method | seconds | total influence (nats) "
        "| time ratio | influence ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"{head} | reference | {reference_seconds:.1f} | {reference.total_influence:.4f} | 1 | 1 |")
    for seed in range(args.fast_repeats):
        seconds, basis = run("fast", seed)
        print(
            f"{head} | fast (seed {seed}) | {seconds:.1f} | {basis.total_influence:.4f} | "
            f"{reference_seconds / seconds:.1f}x | {basis.total_influence / reference.total_influence:.3f} |",
            flush=True,
        )
    print("reference influences:", [round(x, 4) for x in reference.influences.tolist()])
    print("fast influences (last seed):", [round(x, 4) for x in basis.influences.tolist()])


if __name__ == "__main__":
    main()
