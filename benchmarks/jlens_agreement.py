"""lenslab's Jacobian-lens fit against TransformerLens 4.3's `JacobianLens.fit` on one model and the same prompts.

    python benchmarks/jlens_agreement.py --model /work/shared/models/austen-gpt2-6l \
        --data /work/shared/data/austen.txt --prompts 8 --output jlens_agreement.json

Both fit on the same token ids: the first `--prompts` paragraphs of at least `--seq-len` tokens after the held-out
text, as TransformerLens tokenises them (its `to_tokens` prepends the BOS token), cut to `--seq-len`. The model is
float32 on the CPU; TransformerLens wraps a copy of it, booted offline from the loaded model object. Then both
lenses, and the logit lens, are scored by `lenslab.evaluate` on the first `--heldout-tokens` tokens of the text,
which neither fit saw. Prints (and writes) the largest difference between the two J per block, each fit's seconds,
and the per-position KL of the three lenses.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

from lenslab import LogitLens, ModelView, load_model
from lenslab.evaluate import evaluate_lenses
from lenslab.jacobian import JacobianLens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local model folder")
    parser.add_argument("--data", type=Path, required=True, help="a .txt file, paragraphs separated by blank lines")
    parser.add_argument("--prompts", type=int, default=8, help="prompts both fits use (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per prompt (default: %(default)s)")
    parser.add_argument("--dim-batch", type=int, default=32, help="copies per backward, both (default: %(default)s)")
    parser.add_argument("--heldout-tokens", type=int, default=16384, help="tokens scored (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    loaded = load_model(args.model, dtype="float32", device="cpu")
    view = ModelView.from_model(loaded.model)
    bridge = TransformerBridge.boot_transformers(
        args.model, hf_model=copy.deepcopy(loaded.model), tokenizer=loaded.tokenizer, device="cpu"
    )
    bridge.eval()

    text = args.data.read_text(encoding="utf-8")
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[0]
    heldout_chars = len(loaded.tokenizer.decode(ids[: args.heldout_tokens]))
    seq = 64  # held-out sequences of 64 tokens
    heldout = ids[: args.heldout_tokens // seq * seq].reshape(-1, seq)
    prompts, tokens = [], []
    for paragraph in text[heldout_chars:].split("\n\n"):
        row = bridge.to_tokens(paragraph)[:, : args.seq_len]
        if row.shape[1] == args.seq_len:
            prompts.append(paragraph)
            tokens.append(row)
        if len(prompts) == args.prompts:
            break

    start = time.perf_counter()
    theirs = TLJacobianLens.fit(
        bridge, prompts, corpus=str(args.data.name), dim_batch=args.dim_batch, max_seq_len=args.seq_len,
        show_progress=False,
    )  # fmt: skip
    tl_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ours = JacobianLens.fit(view, torch.cat(tokens), dim_batch=args.dim_batch)
    lenslab_seconds = time.perf_counter() - start

    as_ours = JacobianLens(view, torch.stack([theirs.jacobians[block] for block in theirs.source_layers]))
    difference = {
        block: (ours.jacobian(block + 1) - theirs.jacobians[block]).abs().max().item() for block in theirs.source_layers
    }
    scale = {block: theirs.jacobians[block].abs().max().item() for block in theirs.source_layers}
    lenses = {"logit": LogitLens(view), "lenslab": ours, "transformer_lens": as_ours}
    result = evaluate_lenses(view, lenses, heldout, batch_size=16)
    kl = {name: metrics.kl for name, metrics in result.lenses.items()}
    record = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "model": args.model,
        "prompts": len(prompts),
        "seq_len": args.seq_len,
        "dim_batch": args.dim_batch,
        "heldout_tokens": result.tokens,
        "seconds": {"lenslab": lenslab_seconds, "transformer_lens": tl_seconds},
        "max_abs_difference": difference,
        "max_abs_entry": scale,
        "layers": result.layers,
        "kl": kl,
    }
    print(f"{len(prompts)} prompts of {args.seq_len} tokens; held-out tokens scored: {result.tokens}")
    print(f"fit seconds: lenslab {lenslab_seconds:.1f}, TransformerLens {tl_seconds:.1f}")
    for block, value in difference.items():
        print(f"block {block}: max |J_lenslab - J_TL| = {value:.2e} (largest |J| entry {scale[block]:.2f})")
    print(f"{'position':>12} " + " ".join(f"{name:>16}" for name in kl))
    for position, layer in enumerate(result.layers):
        print(f"{layer:>12} " + " ".join(f"{kl[name][position]:16.4f}" for name in kl))
    if args.output:
        args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
