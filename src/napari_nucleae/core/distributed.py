"""Training on several processes with PyTorch DDP, launched by ``torchrun``.

``torchrun --nproc-per-node K -m napari_nucleae.cli train --project P --distributed`` starts K
processes; each reads the rank and world size that torchrun sets in its environment, trains on
its own share of the chunks and averages gradients (DDP) and losses (``all_reduce``) with the
others. Rank 0 alone writes checkpoints and history.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import InputError

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        """The process that writes checkpoints and reports progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def device(self, device: torch.device) -> torch.device:
        """On CUDA, this process's own GPU (``cuda:LOCAL_RANK``)."""
        if device.type == "cuda" and self.distributed:
            return torch.device("cuda", self.local)
        return device

    def mean(self, values: list[float], device: torch.device) -> list[float]:
        """``values`` averaged over all processes (unchanged in a single process)."""
        return [v / self.world for v in self.total(values, device)]

    def total(self, values: list[float], device: torch.device) -> list[float]:
        """``values`` summed over all processes (unchanged in a single process)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        """Wait for every process (no-op in a single process)."""
        if self.distributed:
            dist.barrier()


SINGLE = Ranks()  # one process


def torchrun_ranks() -> Ranks:
    """The ranks torchrun set in the environment; an :class:`InputError` without them."""
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise InputError(
            f"--distributed expects to be launched by torchrun ({', '.join(missing)} not set): "
            "torchrun --nproc-per-node K -m napari_nucleae.cli train --project P --distributed"
        )
    return Ranks(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    )


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Ranks]:
    """Join torchrun's process group (NCCL on CUDA, gloo elsewhere) for the block; one that
    is already initialised is used and left open."""
    if dist.is_initialized():
        yield Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return
    ranks = torchrun_ranks()
    if device.type == "cuda":
        torch.cuda.set_device(ranks.local)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield ranks
    finally:
        dist.destroy_process_group()
