"""torchrun support shared by training (DDP) and extraction (each rank its share of the cache chunks)."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextmanager
def distributed_context() -> Iterator[Distributed]:
    """Initialise DDP when launched by torchrun; tear down in the order this torch needs to exit cleanly."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield Distributed()
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    info = Distributed(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    try:
        yield info
    finally:
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def pick_device(requested: str | None, dist_info: Distributed) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", dist_info.local_rank)
    return torch.device("cpu")


def shard() -> tuple[int, int]:
    """(rank, world size) of the running process group, (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank; nothing to wait for outside torchrun."""
    if shard()[1] > 1:
        dist.barrier()
