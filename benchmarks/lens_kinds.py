"""Benchmark the lens kinds side by side: logit, linear, Jacobian and tuned, each made and scored by lenslab itself.

    python benchmarks/lens_kinds.py --model /work/shared/models/austen-gpt2-6l --data /work/shared/data/austen.txt \
        --workdir /tmp/kinds-austen --output austen.json
    python benchmarks/lens_kinds.py --model smollm2 ...     # 'smollm2': the GGUF `lenslab example-model` caches

One run makes the three lenses that need making with `lenslab train --kind linear | jacobian | tuned`, one after
another, each in a process of its own (the command a user runs, so its wall time includes loading the model), and
then scores all four with one `lenslab eval` on the held-out text that training leaves out: per-position KL to the
model's output, top-1 agreement and cross-entropy, and bits per byte. The tuned lens's closed-form start reads the
same tokens as the linear lens (`--linear-tokens`), so the tuned lens is the linear lens plus its SGD steps.
Cost: each lens's own fitting or training seconds (as it records them), the command's wall seconds, and the tokens
it read. Prints a Markdown table per model; `--output` also keeps everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

KINDS = ("linear", "jacobian", "tuned")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder or .gguf; 'smollm2' for the example model")
    parser.add_argument("--data", required=True, help="a text file")
    parser.add_argument("--workdir", type=Path, required=True, help="where the lenses and the evaluation go")
    parser.add_argument("--seq-len", type=int, default=128, help="linear, tuned and eval (default: %(default)s)")
    parser.add_argument("--heldout-tokens", type=int, default=16384, help="scored (default: %(default)s)")
    parser.add_argument("--linear-tokens", type=int, default=65536, help="and the tuned start (default: %(default)s)")
    parser.add_argument("--jacobian-prompts", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--jacobian-seq-len", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--dim-batch", type=int, default=32, help="Jacobian backward batch (default: %(default)s)")
    parser.add_argument("--tuned-steps", type=int, default=30, help="(default: %(default)s)")
    parser.add_argument("--tuned-tokens-per-step", type=int, default=8192, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default: %(default)s)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="which lenses to make (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    return parser.parse_args(argv)


def lenslab(*argv: str) -> float:
    """Run `python -m lenslab ARGV`, all its output to stderr (the progress; the tables of this script go to stdout),
    raising on failure; its wall seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lenslab", *argv], check=True, stdout=sys.stderr)
    return time.perf_counter() - started


def model_path(name: str) -> str:
    if name != "smollm2":
        return name
    from lenslab.example_model import fetch_example_model

    return str(fetch_example_model())


def train_argv(args: argparse.Namespace, model: str, kind: str) -> list[str]:
    common = ["train", "--kind", kind, "--model", model, "--data", args.data, "--device", "cpu", "--dtype", "float32",
              "--heldout-tokens", str(args.heldout_tokens), "--output", str(args.workdir / kind), "--overwrite",
              "--no-resume"]  # fmt: skip
    if kind == "linear":
        return [*common, "--seq-len", str(args.seq_len), "--train-tokens", str(args.linear_tokens),
                "--batch-size", str(args.batch_size)]  # fmt: skip
    if kind == "jacobian":
        return [*common, "--seq-len", str(args.jacobian_seq_len), "--dim-batch", str(args.dim_batch),
                "--train-tokens", str(args.jacobian_prompts * args.jacobian_seq_len)]  # fmt: skip
    return [*common, "--seq-len", str(args.seq_len), "--init-tokens", str(args.linear_tokens),
            "--steps", str(args.tuned_steps), "--tokens-per-step", str(args.tuned_tokens_per_step),
            "--batch-size", str(args.batch_size)]  # fmt: skip


def lens_cost(folder: Path, kind: str) -> dict:
    """The seconds a lens's making took by its own account, and the tokens it read, from its folder."""
    metadata = json.loads((folder / "config.json").read_text())["metadata"]
    if kind == "tuned":
        log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines() if line.strip()]
        # The closed-form start's tokens are read again by the steps, so both count.
        return {"seconds": log[-1]["elapsed"], "tokens": metadata["init_tokens"] + metadata["tokens_seen"]}
    if kind == "jacobian":
        return {"seconds": metadata["seconds"], "tokens": metadata["prompts"] * metadata["seq_len"]}
    return {"seconds": metadata["seconds"], "tokens": metadata["tokens"]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = model_path(args.model)
    kinds = args.kinds.split(",")
    costs = {}
    for kind in kinds:
        wall = lenslab(*train_argv(args, model, kind))
        costs[kind] = lens_cost(args.workdir / kind, kind) | {"wall_seconds": wall}
        print(f"{kind}: {costs[kind]}", file=sys.stderr, flush=True)
    evaluation = args.workdir / "eval.json"
    lenses = [arg for kind in kinds for arg in ("--lens", str(args.workdir / kind))]
    eval_wall = lenslab(
        "eval", "--model", model, "--data", args.data, "--device", "cpu", "--dtype", "float32", *lenses,
        "--seq-len", str(args.seq_len), "--tokens", str(args.heldout_tokens), "--output", str(evaluation),
    )  # fmt: skip
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "settings": {key: str(value) for key, value in vars(args).items()},
        "costs": costs,
        "eval_wall_seconds": eval_wall,
        "eval": json.loads(evaluation.read_text()),
    }
    print(markdown(result))
    if args.output:
        args.output.write_text(json.dumps(result, indent=1))
    return result


def markdown(result: dict) -> str:
    """A summary table (mean over positions 0..L-1) and a per-position KL table, in Markdown."""
    evaluation = result["eval"]
    factor = evaluation["nats_to_bits_per_byte"]
    positions = len(evaluation["layers"]) - 1  # the last position is the model itself for every lens
    lines = [
        f"{evaluation['model']}: {evaluation['tokens']:,} scored tokens; model's own CE "
        f"{evaluation['final']['ce'] * factor:.4f} bits/byte",
        "",
        "| lens | mean KL (nats) | mean KL (bits/byte) | mean top-1 agreement | mean CE (bits/byte) | fit seconds | "
        "wall seconds | tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {name: evaluation["kinds"][name] for name in evaluation["lenses"]}
    for name, kind in names.items():
        metrics = evaluation["lenses"][name]
        mean = {key: sum(metrics[key][:positions]) / positions for key in ("kl", "top1_agreement", "ce")}
        cost = result["costs"].get(kind)
        paid = f"{cost['seconds']:,.1f} | {cost['wall_seconds']:,.1f} | {cost['tokens']:,}" if cost else "– | – | –"
        lines.append(
            f"| {kind} | {mean['kl']:.4f} | {mean['kl'] * factor:.4f} | {mean['top1_agreement']:.3f} | "
            f"{mean['ce'] * factor:.4f} | {paid} |"
        )
    lines += ["", "| lens | " + " | ".join(evaluation["layers"][:positions]) + " |",
              "|---|" + "---:|" * positions]  # fmt: skip
    for key, label in (("kl", "KL (nats)"), ("top1_agreement", "top-1")):
        for name, kind in names.items():
            values = evaluation["lenses"][name][key][:positions]
            lines.append(f"| {kind} {label} | " + " | ".join(f"{value:.4f}" for value in values) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
