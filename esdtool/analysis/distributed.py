"""Analysis across processes with torch.distributed (``torchrun``): who computes what, and
bringing the rows home.

Nothing here starts processes or talks to a network by itself: ``torchrun`` (or any launcher
that sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR) does, and torch.distributed carries the
rows. Each rank computes a share of the tensors balanced by estimated cost, on its own device
(cuda:LOCAL_RANK, or the CPU); rank 0 gathers every row and writes the one table.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from esdtool.spectral.spectra import matrix_view

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job. ``group``: the process group rows travel on (gloo,
    so pickled rows never go through GPU memory); ``owns``: whether we created the default
    group and so must destroy it."""

    rank: int
    size: int
    local_rank: int
    group: Any = None
    owns: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """WORLD_SIZE as a launcher set it (1 when not launched)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


ALONE = World(rank=0, size=1, local_rank=0)


def join(device_setting: str) -> World:
    """Join the launcher's job, or :data:`ALONE` (a world of one) when not launched. Initialises
    the default process group if the caller has not (nccl when this rank computes on CUDA, else
    gloo)."""
    if launched_world_size() <= 1:
        return ALONE
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        on_cuda = device_setting != "cpu" and torch.cuda.is_available()
        if on_cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group("nccl" if on_cuda else "gloo")
        owns = True
    group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return World(dist.get_rank(), dist.get_world_size(), local_rank, group, owns)


def rank_device(device_setting: str, world: World) -> str:
    """The device string this rank computes on: "auto" becomes cuda:LOCAL_RANK under a
    launcher with GPUs (one GPU per process), else stays as given."""
    if world.size == 1 or device_setting != "auto" or not torch.cuda.is_available():
        return device_setting
    return f"cuda:{world.local_rank % torch.cuda.device_count()}"


def matrix_cost(shape: Sequence[int]) -> float:
    """Relative cost of one tensor's spectra: the Gram product (M^2 N), the eigensolver (~4 M^3)
    and the KS search (M^2), times the number of matrices (experts, kernel positions)."""
    view = matrix_view(tuple(shape))
    if view is None:
        return 0.0
    m, n = min(view.rows, view.cols), max(view.rows, view.cols)
    return float(view.count) * (m * m * n + 4.0 * m**3 + m * m)


def partition(costs: Sequence[float], parts: int) -> list[list[int]]:
    """Split item indices into ``parts`` lists of about equal total cost: largest first, each
    to the least-loaded part (LPT; within 4/3 of the best split). Each list ascends."""
    loads = [(0.0, p) for p in range(parts)]
    heapq.heapify(loads)
    out: list[list[int]] = [[] for _ in range(parts)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, p = heapq.heappop(loads)
        out[p].append(index)
        heapq.heappush(loads, (load + costs[index], p))
    return [sorted(indices) for indices in out]


def gather_rows(world: World, rows: list[T]) -> list[T] | None:
    """Every rank's rows on rank 0 (None elsewhere). The rows are pickled between our own
    processes; nothing read from a checkpoint is ever unpickled."""
    if world.size == 1:
        return list(rows)
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * world.size if world.main else None
    dist.gather_object(rows, gathered, dst=0, group=world.group)
    if gathered is None:
        return None
    return [row for part in gathered for row in part]


def barrier(world: World) -> None:
    """Wait for every rank (nothing to wait for alone)."""
    if world.size == 1:
        return
    import torch.distributed as dist

    dist.barrier(group=world.group)


def leave(world: World) -> None:
    """Destroy what :func:`join` created (the caller's own group is left alone)."""
    if world.size == 1:
        return
    import torch.distributed as dist

    if world.group is not None:
        dist.destroy_process_group(world.group)
    if world.owns:
        dist.destroy_process_group()
