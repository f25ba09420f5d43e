"""Distributed training: two gloo processes, each reading half of every step, train the lens one process does."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from tiny_models import VOCAB, tiny_model

from lenslab.adapter import ModelView
from lenslab.lenses import TunedLens
from lenslab.train import TrainConfig, init_distributed, shutdown_distributed, train_lens
from lenslab.train.checkpoints import LOG_FILE

# 8 sequences per step: 4 per process, in micro-batches of 2 (so both accumulation and averaging are exercised).
# The paper recipe: on a random tiny model the fast recipe's closed-form start is almost exact (KL ~ 2e-7), so a
# relative loss comparison would test float32 rounding; the fast recipe's DDP run is tested in test_recipes.py.
CONFIG = TrainConfig(recipe="paper", steps=3, tokens_per_step=8 * 16, batch_size=2, checkpoint_every=2)


def tokens() -> torch.Tensor:
    return torch.randint(3, VOCAB, (24, 16), generator=torch.Generator().manual_seed(0))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _join(rank: int, world_size: int, port: int) -> torch.device:
    """Set the environment torchrun would set for this process, then join the group as the CLI does."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )  # fmt: skip
    torch.set_num_threads(1)
    return init_distributed("cpu")


def _worker(rank: int, world_size: int, port: int, root: Path) -> None:
    """One torchrun-like process training with the library as the CLI uses it."""
    device = _join(rank, world_size, port)
    try:
        view = ModelView.from_model(tiny_model("gpt2").to(device))
        result = train_lens(view, tokens(), CONFIG, output_dir=root / "lens", progress=False)
        torch.save(
            {"lens": result.lens.state_dict(), "losses": [record.loss for record in result.history]},
            root / f"rank{rank}.pt",
        )
    finally:
        shutdown_distributed()


@pytest.mark.slow  # two fresh interpreters import torch and transformers: about half a minute on 2 cores
def test_two_gloo_processes_train_the_same_lens_as_one(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)

    view = ModelView.from_model(tiny_model("gpt2"))
    single = train_lens(view, tokens(), CONFIG, progress=False)
    saved = TunedLens.load(tmp_path / "lens", view)
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert state["losses"] == pytest.approx([record.loss for record in single.history], rel=1e-4)
        for name, tensor in single.lens.state_dict().items():
            torch.testing.assert_close(state["lens"][name], tensor, atol=1e-6, rtol=1e-5, msg=name)
            torch.testing.assert_close(saved.state_dict()[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
    # Rank 0 alone writes: one log record per step, not one per process.
    records = [json.loads(line) for line in (tmp_path / "lens" / LOG_FILE).read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2, 3]
    assert saved.metadata["processes"] == 2


def jacobian_prompts() -> torch.Tensor:
    # 5 prompts: an odd number, so the last round has a prompt for one process only.
    return torch.randint(3, VOCAB, (5, 20), generator=torch.Generator().manual_seed(1))


def _jacobian_worker(rank: int, world_size: int, port: int, root: Path) -> None:
    """`_worker` for the Jacobian lens: prompts split across processes, sums added over them, a checkpoint between."""
    from lenslab.train.jacobian_fit import fit_jacobian_lens

    device = _join(rank, world_size, port)
    try:
        view = ModelView.from_model(tiny_model("gpt2").to(device))
        fitted = fit_jacobian_lens(
            view, jacobian_prompts(), dim_batch=16, output_dir=root / "jlens", checkpoint_every=2, progress=False
        )
        torch.save(fitted.lens.state_dict(), root / f"jacobian-rank{rank}.pt")
    finally:
        shutdown_distributed()


@pytest.mark.slow
def test_two_gloo_processes_fit_the_same_jacobian_lens_as_one(tmp_path):
    from lenslab.jacobian import JacobianLens

    mp.spawn(_jacobian_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)

    view = ModelView.from_model(tiny_model("gpt2"))
    single = JacobianLens.fit(view, jacobian_prompts(), dim_batch=16)
    saved = JacobianLens.load(tmp_path / "jlens", view)
    assert saved.prompts == 5 and saved.metadata["processes"] == 2
    for state in [saved.state_dict()] + [
        torch.load(tmp_path / f"jacobian-rank{rank}.pt", weights_only=True) for rank in range(2)
    ]:
        for name, tensor in single.state_dict().items():
            torch.testing.assert_close(state[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def _linear_worker(rank: int, world_size: int, port: int, root: Path) -> None:
    """One torchrun-like process fitting the linear lens, its share of the sequences read, the sums averaged."""
    from lenslab.train.linear_fit import fit_linear_lens

    device = _join(rank, world_size, port)
    try:
        view = ModelView.from_model(tiny_model("gpt2").to(device))
        fitted = fit_linear_lens(view, tokens(), micro_batch=2, output_dir=root / "linear", progress=False)
        torch.save(fitted.lens.state_dict(), root / f"linear-rank{rank}.pt")
    finally:
        shutdown_distributed()


@pytest.mark.slow  # two fresh interpreters, as above
def test_two_gloo_processes_fit_the_same_linear_lens_as_one(tmp_path):
    from lenslab.lenses import LinearLens
    from lenslab.train.linear_fit import fit_linear_lens

    mp.spawn(_linear_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)

    view = ModelView.from_model(tiny_model("gpt2"))
    single = fit_linear_lens(view, tokens(), micro_batch=2, progress=False)
    saved = LinearLens.load(tmp_path / "linear", view)
    assert saved.metadata["processes"] == 2
    for state in [saved.state_dict()] + [
        torch.load(tmp_path / f"linear-rank{rank}.pt", weights_only=True) for rank in range(2)
    ]:
        for name, tensor in single.lens.state_dict().items():
            torch.testing.assert_close(state[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
