"""Benchmark lenslab against tuned-lens 0.2.0 on a real pretrained model: training, evaluation and `show`.

    python benchmarks/real_model.py --tuned-lens-python /work/tl-venv/bin/python --output real_model.json

The model is SmolLM2-135M-Instruct (`lenslab example-model`; 30 layers, d_model 576, vocabulary 49,152), or any
local model folder given to `--model`. Three jobs, each run by lenslab and by tuned-lens in a fresh process of its
own (so that peak memory is its own; see `train_speed.PeakMemory`):
- training: `benchmarks/train_speed.py`'s workers (lenslab's fast recipe with its closed-form start, tuned-lens's
  own loop), the same steps, tokens per step and micro-batches; tokens/s of the steps and peak memory;
- evaluation: per-position KL(p_final || p_lens) of a tuned lens over held-out tokens: `lenslab.evaluate` against
  a loop over tuned-lens's `TunedLens.forward` (what its eval loop does per batch); tokens/s and peak memory;
- show: one prompt's prediction trajectory, `lenslab.trajectory.compute_trajectories` against tuned-lens's
  `PredictionTrajectory.from_lens_and_model`; seconds, model load excluded.
Each job uses an untrained (zero) tuned lens, which costs the same as a trained one.

It also prints the cost model of `docs/benchmarks.md`: multiply-adds per token of the frozen forward and of the
lens (L x (d^2 + d V), x3 when training), and the rate this machine reached, to predict other models' run times.

Setting up the tuned-lens side: see `train_speed.py`. transformers 4 reads the folder through a copy of its
`config.json` with the rope settings spelled the transformers-4 way (`tuned_lens_folder`).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_speed import RESULT_PREFIX, PeakMemory  # noqa: E402

PROMPT = "The Eiffel Tower is in the city of Paris, which is the capital of France. It was built in"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="local model folder (default: the example model, dequantised)")
    parser.add_argument("--data", default=str(Path(__file__).parents[1] / "examples" / "persuasion.txt"))
    parser.add_argument("--steps", type=int, default=2, help="training steps (default: %(default)s)")
    parser.add_argument("--tokens-per-step", type=int, default=512, help="(default: %(default)s)")
    parser.add_argument(
        "--init-tokens", type=int, default=4096, help="lenslab's closed-form start (default: %(default)s)"
    )
    parser.add_argument("--eval-tokens", type=int, default=1024, help="held-out tokens scored (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker (default: %(default)s)")
    parser.add_argument("--tuned-lens-python", type=Path, required=True, help="a Python with tuned-lens 0.2.0")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # "lenslab:eval", "tuned-lens:show", ...
    return parser.parse_args(argv)


def heldout_ids(args: argparse.Namespace, tokenizer):
    """The first `--eval-tokens` tokens of the data in `--seq-len` chunks, read the same way for both libraries."""
    import torch

    text = Path(args.data).read_text(encoding="utf-8")
    ids = tokenizer(text[: args.eval_tokens * 20], return_tensors="pt").input_ids[0]
    rows = args.eval_tokens // args.seq_len
    return ids[: rows * args.seq_len].reshape(rows, args.seq_len).to(torch.long)


def lenslab_worker(args: argparse.Namespace, job: str) -> dict:
    import torch

    from lenslab import LogitLens, ModelView, TunedLens, load_model
    from lenslab.evaluate import evaluate_lenses
    from lenslab.trajectory import TrajectoryConfig, compute_trajectories, encode_prompt

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype="float32", device="cpu")
    view = ModelView.from_model(model)
    lens = TunedLens.from_model(view)
    memory = PeakMemory("cpu")
    started = time.perf_counter()
    if job == "eval":
        ids = heldout_ids(args, tokenizer)
        evaluate_lenses(view, {"tuned": lens}, ids, batch_size=args.batch_size)
        tokens = ids[:, :-1].numel()
    else:
        ids = encode_prompt(tokenizer, PROMPT)
        compute_trajectories(view, [LogitLens(view), lens], ids, tokenizer=tokenizer, config=TrajectoryConfig())
        tokens = ids.numel()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": tokens, "peak_memory_mib": memory.mib()}


def tuned_lens_worker(args: argparse.Namespace, job: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from tuned_lens import TunedLens
    from tuned_lens.plotting import PredictionTrajectory

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(args.model) / "tokenizer.json"))
    lens = TunedLens.from_model(model)
    memory = PeakMemory("cpu")
    started = time.perf_counter()
    with torch.no_grad():
        if job == "eval":
            ids = heldout_ids(args, tokenizer)
            for batch in ids.split(args.batch_size):
                output = model(batch, output_hidden_states=True)
                log_p = output.logits[:, :-1].float().log_softmax(-1)
                for index, h in enumerate(output.hidden_states[:-1]):
                    log_q = lens(h[:, :-1], index).float().log_softmax(-1)
                    (log_p.exp() * (log_p - log_q)).sum(-1).mean()
            tokens = ids[:, :-1].numel()
        else:
            ids = tokenizer(PROMPT).input_ids
            PredictionTrajectory.from_lens_and_model(lens, model, ids, tokenizer=tokenizer)
            tokens = len(ids)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": tokens, "peak_memory_mib": memory.mib()}


def run_job(python: Path | str, worker: str, args: argparse.Namespace, model: Path) -> dict:
    command = [
        str(python),
        __file__,
        "--worker",
        worker,
        "--model",
        str(model),
        "--data",
        args.data,
        "--eval-tokens",
        str(args.eval_tokens),
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--tuned-lens-python",
        str(args.tuned_lens_python),
    ]
    print(f"{worker} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        sys.exit(f"{worker} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


def tuned_lens_folder(model: Path, scratch: Path) -> Path:
    """A view of `model` that transformers 4 reads alike: the weights linked, rope_theta at the config's top."""
    folder = scratch / "model-for-transformers-4"
    folder.mkdir()
    for item in model.iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item.resolve())
    config = json.loads((model / "config.json").read_text())
    config.update(config.get("rope_parameters") or {})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def default_model() -> Path:
    import torch

    from lenslab.example_model import fetch_example_model
    from lenslab.gguf import dequantised_folder

    return dequantised_folder(fetch_example_model(), torch.float32)


def cost_model(model: Path, tokens_per_second: float) -> dict:
    """Multiply-adds per token: the frozen forward (about its parameters) plus the lens, x3 for its training."""
    config = json.loads((model / "config.json").read_text())
    layers, d, vocab = config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]
    weights = sum(size for size in _tensor_sizes(model))
    forward = weights - (0 if config.get("tie_word_embeddings") else vocab * d)  # the embedding is a lookup
    lens = layers * (d * d + d * vocab)
    train = forward + 3 * lens
    return {"forward_macs": forward, "lens_macs": lens, "train_macs_per_token": train,
            "achieved_gflops": 2 * train * tokens_per_second / 1e9}  # fmt: skip


def _tensor_sizes(model: Path):
    from safetensors import safe_open

    for file in model.glob("*.safetensors"):
        with safe_open(str(file), "pt") as tensors:
            for name in tensors.keys():
                shape = tensors.get_slice(name).get_shape()
                size = 1
                for dim in shape:
                    size *= dim
                yield size


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        library, job = args.worker.split(":")
        worker = lenslab_worker if library == "lenslab" else tuned_lens_worker
        print(RESULT_PREFIX + json.dumps(worker(args, job)), flush=True)
        return
    model = Path(args.model) if args.model else default_model()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="real_model_") as scratch:
        theirs = tuned_lens_folder(model, Path(scratch))
        training = subprocess.run([
            sys.executable, str(Path(__file__).parent / "train_speed.py"), "--model", str(theirs), "--data", args.data,
            "--recipes", "fast", "--steps", str(args.steps), "--tokens-per-step", str(args.tokens_per_step),
            "--init-tokens", str(args.init_tokens), "--seq-len", str(args.seq_len), "--batch-size",
            str(args.batch_size), "--heldout-tokens", str(args.eval_tokens), "--threads", str(args.threads),
            "--tuned-lens-python", str(args.tuned_lens_python), "--output", str(Path(scratch) / "train.json"),
        ], capture_output=True, text=True, check=False)  # fmt: skip
        if training.returncode != 0:
            sys.exit(f"train_speed.py failed:\n{training.stderr[-4000:]}")
        print(training.stdout)
        results["train"] = json.loads((Path(scratch) / "train.json").read_text())
        for job in ("eval", "show"):
            results[job] = {
                "lenslab": run_job(sys.executable, f"lenslab:{job}", args, model),
                "tuned-lens": run_job(args.tuned_lens_python, f"tuned-lens:{job}", args, theirs),
            }
    runs = results["train"]["runs"]
    ours, reference = runs["lenslab fast"], runs["tuned-lens"]
    results["cost_model"] = cost_model(model, ours["tokens_per_second"])
    print(f"training: lenslab {ours['tokens_per_second']:.1f} tok/s (steps), tuned-lens "
          f"{reference['tokens_per_second']:.1f}; x{ours['tokens_per_second'] / reference['tokens_per_second']:.2f} "
          f"speed, x{ours['peak_memory_mib'] / reference['peak_memory_mib']:.2f} peak memory")  # fmt: skip
    for job in ("eval", "show"):
        a, b = results[job]["lenslab"], results[job]["tuned-lens"]
        print(f"{job}: lenslab {a['seconds']:.2f} s ({a['tokens'] / a['seconds']:.1f} tok/s, "
              f"{a['peak_memory_mib']:.0f} MiB), tuned-lens {b['seconds']:.2f} s "
              f"({b['tokens'] / b['seconds']:.1f} tok/s, {b['peak_memory_mib']:.0f} MiB); "
              f"time x{a['seconds'] / b['seconds']:.2f}")  # fmt: skip
    print("cost model:", json.dumps(results["cost_model"]))
    if args.output:
        results |= {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                    "settings": {key: str(value) for key, value in vars(args).items() if key != "worker"}}  # fmt: skip
        args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
