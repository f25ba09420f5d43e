"""The device check of a GPU session: lenslab's CUDA paths at SmolLM2-135M's shapes, one short run.

    python benchmarks/cuda_smollm2.py --output $OUT/cuda_smollm2.json          # on the GPU machine, ~2 minutes

A bf16 model of SmolLM2-135M-Instruct's architecture (Llama, 30 layers, d_model 576, vocabulary 49,152; the config
below) with random weights: the device machine reaches no package index and carries too little to bring the 93 MB
GGUF, and tokens/s and memory depend on the shapes, not on the weights' values. On random token ids it records
- training: the fast recipe (closed-form start, then whitened SGD steps) with bf16 autocast, tokens/s of the steps,
  of the start, and peak GPU memory;
- evaluation: `evaluate_lenses` of the logit and the tuned lens, tokens/s and peak memory;
- show: `compute_trajectories` of one 64-token prompt, seconds.
The lens's quality on random weights means nothing; use `benchmarks/real_model.py` for that. `--device cpu`
checks the script itself.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lenslab import LogitLens, ModelView
from lenslab.evaluate import evaluate_lenses
from lenslab.train import TrainConfig, train_lens
from lenslab.trajectory import TrajectoryConfig, compute_trajectories

SMOLLM2_135M = {
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True, "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": 2,
}  # fmt: skip
"""SmolLM2-135M-Instruct's config.json (architecture fields)."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tokens-per-step", type=int, default=2**15)
    parser.add_argument("--init-tokens", type=int, default=2**15)
    parser.add_argument("--eval-tokens", type=int, default=2**15)
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    return parser.parse_args()


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_135M)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).to(device).eval()
    model.config.name_or_path = "SmolLM2-135M shapes, random weights"
    view = ModelView.from_model(model)
    tokens = torch.randint(3, config.vocab_size, (2048 * 1024 // args.seq_len, args.seq_len))
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()}

    reset_peak(device)
    train_tokens = tokens[: max(args.steps * args.tokens_per_step, args.init_tokens) // args.seq_len]
    started = time.perf_counter()
    trained = train_lens(
        view, train_tokens,
        TrainConfig(steps=args.steps, tokens_per_step=args.tokens_per_step, init_tokens=args.init_tokens),
    )  # fmt: skip
    total = time.perf_counter() - started
    steps_seconds, done = 0.0, 0
    for record in trained.history:  # `tokens` counts every step so far
        steps_seconds += (record.tokens - done) / record.tokens_per_second
        done = record.tokens
    results["train"] = {
        "steps_tokens_per_second": done / steps_seconds,
        "start_seconds": total - steps_seconds,
        "init_tokens": trained.init_tokens,
        "peak_memory_mib": peak_mib(device),
    }

    reset_peak(device)
    heldout = tokens[-args.eval_tokens // args.seq_len :]
    started = time.perf_counter()
    evaluate_lenses(view, {"logit": LogitLens(view), "tuned": trained.lens}, heldout, batch_size=8)
    seconds = time.perf_counter() - started
    results["eval"] = {"tokens_per_second": heldout[:, :-1].numel() / seconds, "peak_memory_mib": peak_mib(device)}

    prompt = tokens[0, :64]
    started = time.perf_counter()
    compute_trajectories(view, [LogitLens(view), trained.lens], prompt, config=TrajectoryConfig())
    results["show"] = {"seconds": time.perf_counter() - started, "tokens": len(prompt)}

    results |= {"date": date.today().isoformat(), "settings": {k: str(v) for k, v in vars(args).items()}}
    print(json.dumps(results, indent=2))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
