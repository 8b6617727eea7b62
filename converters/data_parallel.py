"""Data-parallel compression: each rank of a torch.distributed process group works on its own
calibration windows, and what they measure is summed across ranks.

Launched with `torchrun --nproc-per-node N` (gloo on CPU, NCCL on CUDA), the code every rank
runs is the one-process code: outside a process group `shard` returns every window and
`sum_across_ranks` does nothing, so one process is world size 1, not a separate path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(windows: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """This rank's contiguous share of `windows`, cut at whole batches of `batch_size` so that every
    rank runs exactly the batches one process would (shares differ by at most one batch).

    Refuses fewer batches than ranks: a rank with nothing to run would have nothing to sum, and
    the collective would hang on the ranks that have something."""
    rank, size = world()
    batches = -(-len(windows) // batch_size)
    if batches < size:
        raise ValueError(f"{len(windows)} calibration windows make {batches} batches of {batch_size}, "
                         f"too few to share among {size} ranks: use at least {size * batch_size} samples")
    base, extra = divmod(batches, size)
    start = rank * base + min(rank, extra)
    return windows[start * batch_size : (start + base + (rank < extra)) * batch_size]


def sum_across_ranks(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each tensor over the ranks in place, in a fixed key order every rank shares.

    The ranks must hold the same keys with the same shapes (checked by name first, so a mismatch
    is an error that names the keys, not a hang or a silently wrong sum)."""
    rank, size = world()
    if size == 1:
        return tensors
    names = sorted(tensors)
    everyone: list[list[str] | None] = [None] * size
    dist.all_gather_object(everyone, names)
    for other, theirs in enumerate(everyone):
        if theirs != names:
            raise RuntimeError(f"rank {rank} holds {names} but rank {other} holds {theirs}")
    for name in names:
        dist.all_reduce(tensors[name], op=dist.ReduceOp.SUM)
    return tensors
