"""Data-parallel training over processes started by `torchrun`.

Every process holds the whole (small) lens and the same training sequences, reads its own share of each step's
batch, and the gradients are averaged before the update, so all processes keep identical lenses and the result
equals one process reading the whole batch. Averaging is one all-reduce per parameter after the step's
backward passes, rather than `DistributedDataParallel`: the loss is back-propagated once per lens position and
micro-batch, and DDP would all-reduce (or need `no_sync` bookkeeping) for each of them.

Rank 0 writes the files and shows progress.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lenslab.errors import LensLabError
from lenslab.loading import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Processes:
    """Where this process stands among those training together."""

    rank: int = 0
    """This process's index, 0..world_size-1."""
    world_size: int = 1
    """Number of processes."""

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and shows progress (rank 0)."""
        return self.rank == 0

    @classmethod
    def current(cls) -> Processes:
        """The process group joined by `init_distributed` (or by the caller), else a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(), world_size=dist.get_world_size())
        return cls()

    def sum(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its sum over the processes, in place."""
        if self.world_size == 1:
            return
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def average(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the processes, in place (gloo has no AVG, hence SUM / n)."""
        self.sum(tensors)
        self._divide(tensors)

    def sum_on(self, tensors: list[torch.Tensor], device: torch.device) -> None:
        """`sum` for tensors kept in host memory when the backend reduces only `device`'s (NCCL: CUDA tensors):
        each is copied there, reduced and copied back, one at a time, so that only one is ever on `device`."""
        if self.world_size == 1:
            return
        for tensor in tensors:
            moved = tensor.to(device)
            self.sum([moved])
            if moved is not tensor:
                tensor.copy_(moved)

    def average_on(self, tensors: list[torch.Tensor], device: torch.device) -> None:
        """`average` for host tensors, as `sum_on` moves them."""
        self.sum_on(tensors, device)
        self._divide(tensors)

    def _divide(self, tensors: list[torch.Tensor]) -> None:
        if self.world_size > 1:
            for tensor in tensors:
                tensor.div_(self.world_size)

    def barrier(self) -> None:
        """Wait for every process (a no-op for one)."""
        if self.world_size > 1:
            dist.barrier()


def init_distributed(device: str | torch.device | None = "auto") -> torch.device:
    """Join the process group `torchrun` describes in the environment; returns this process's device.

    Uses NCCL when `device` resolves to CUDA (each process on `cuda:LOCAL_RANK`) and gloo on CPU. Without
    `torchrun` (no `WORLD_SIZE`, or 1) it only resolves `device`.
    """
    device = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 or dist.is_initialized():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is not None:
            raise LensLabError(
                f"--device {device} names one GPU, but {world_size} processes need one each; pass --device cuda "
                "and each process uses cuda:LOCAL_RANK."
            )
        if local_rank >= torch.cuda.device_count():
            raise LensLabError(
                f"Process LOCAL_RANK={local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); "
                "pass torchrun --nproc_per_node at most the number of GPUs."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    log.info("Joined %s process group as rank %d of %d on %s", backend, dist.get_rank(), world_size, device)
    return device


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
