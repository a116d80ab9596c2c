"""DDP helpers: initialise from torchrun's environment, rank-aware sampling, rank-0-only writes.

Under ``torchrun --nproc_per_node N`` the variables RANK, WORLD_SIZE, LOCAL_RANK are set;
:func:`init_distributed` starts a process group (nccl on CUDA, gloo on CPU). Without them
everything degrades to a single process.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return get_rank() == 0


def init_distributed(device_type: str | None = None) -> tuple[int, int, int]:
    """Initialise a process group when launched by torchrun; returns (rank, world, local_rank)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not is_dist():
        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return get_rank(), get_world_size(), local_rank


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def rank_shards(num_shards: int, rank: int | None = None, world: int | None = None) -> list[int]:
    """The shards rank ``rank`` of ``world`` works on: ``rank, rank + world, ...`` (strided shards
    of fixed consecutive images, so the shards themselves do not depend on the world size)."""
    rank = get_rank() if rank is None else int(rank)
    world = get_world_size() if world is None else int(world)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world size {world}")
    return list(range(rank, int(num_shards), world))


def all_reduce_sum(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Sum of scalar metrics (counts) across ranks (identity in a single process)."""
    if not is_dist() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_reduce_mean(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean of scalar metrics across ranks (identity in a single process)."""
    world = get_world_size()
    return {k: v / world for k, v in all_reduce_sum(values, device).items()}


def any_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is True on any rank."""
    if not is_dist():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


class ResumableSampler(Sampler[int]):
    """Deterministic, rank-sharded sampler: the order of epoch ``e`` depends only on (seed, e).

    ``set_epoch(e)`` picks the epoch, ``set_start(k)`` skips the first ``k`` indices of this rank's
    share (how the engine resumes mid-epoch without reading the skipped samples). Each rank gets
    ``len(dataset) // world`` indices (the tail is dropped so every rank sees as many batches).
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0, rank: int | None = None, world: int | None = None):
        self.n = int(n)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = get_rank() if rank is None else rank
        self.world = get_world_size() if world is None else world
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per = self.n // self.world
        return order[self.rank : per * self.world : self.world]

    def __iter__(self) -> Iterator[int]:
        idx = self._indices()[self.start :]
        self.start = 0  # skipping applies to one pass only
        return iter(idx)

    def __len__(self) -> int:
        return self.n // self.world - self.start
