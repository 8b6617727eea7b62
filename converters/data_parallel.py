"""Data-parallel compression: each rank of a torch.distributed process group works on its own
calibration windows, and what they measure is summed across ranks.

Launched with `torchrun --nproc-per-node N` (gloo on CPU, NCCL on CUDA) or `lowrank … --nproc N`
(`launch`: the same environment torchrun sets, for one machine), the code every rank runs is the
one-process code: outside a process group `shard` returns every window, `sum_across_ranks` does
nothing and `rank_zero_writes` just writes, so one process is world size 1, not a separate path.

Every rank computes; rank 0 alone writes files (folders, checkpoints, records) and the others
wait at a barrier, then read what it wrote: the ranks share a file system (one machine, or
several with the model and output folders on a shared mount). Decisions that read files (resume
or start over) are rank 0's, broadcast, so no two ranks can take different branches and then
wait for each other in different collectives.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from engine.core.workers import free_port

T = TypeVar("T")
TIMEOUT = timedelta(minutes=30)  # a collective waits this long for a rank (rank 0 may be writing a big folder)


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar on rank 0 (the others' would repeat it line for line)."""
    return tqdm(iterable, disable=world()[0] != 0, **kwargs)


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


def split_batch(batch: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This rank's contiguous share of one training batch, and the weight that makes the ranks'
    mean losses add up to the whole batch's: share/batch × world size, since DistributedDataParallel
    averages the ranks' gradients (shares differ by one window when the batch does not divide)."""
    check_batch_size(len(batch))
    local = shard(batch)
    return local, len(local) / len(batch) * world()[1]


def check_batch_size(batch_size: int, option: str = "the batch size") -> None:
    """Refuse a training batch smaller than the world (a rank with no window has no gradient to
    average): checked before the calibration, not at the first step after it."""
    if batch_size < (size := world()[1]):
        raise ValueError(f"{option} {batch_size} cannot be shared among {size} ranks: give at least {size} "
                         "windows per step, or fewer ranks")


class _HiddenStates(nn.Module):
    """A model's final hidden states of a batch as its forward (what DistributedDataParallel wraps)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(self.model.hidden_states(batch))


def hidden_states_fn(model: nn.Module, replicate: bool = True) -> nn.Module:
    """`model`'s hidden states of a batch, [tokens, hidden]: inside a process group through
    DistributedDataParallel, whose backward averages the trainable parameters' gradients over the
    ranks (bucketed, overlapping the backward), so every rank's optimiser takes the same step.
    `replicate=False`: a model already sharded (`shard_layers`), whose FSDP hooks average them.

    Buffers are not synchronised at each step: frozen, they are equal on every rank."""
    wrapped = _HiddenStates(model)
    if world()[1] == 1 or not replicate:
        return wrapped
    cuda = next(model.parameters()).is_cuda
    return DistributedDataParallel(wrapped, device_ids=[torch.cuda.current_device()] if cuda else None,
                                   forward_sync_buffers=False)


def shard_layers(model: nn.Module, ignored: set[nn.Parameter] | None = None) -> None:
    """FSDP (torch's fully_shard) in place: each decoder layer's parameters, and the rest with the
    root, split across the ranks and gathered only around their own forward and backward, so a
    model (its trainable factors, their gradients and Adam's moments) need not fit one device.
    Gradients are averaged over the ranks as DistributedDataParallel's are; `ignored` parameters stay
    whole on every rank, and their gradients to the caller (`average_across_ranks`). World size 1: nothing."""
    if world()[1] == 1:
        return
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)


def average_across_ranks(tensors: list[torch.Tensor]) -> None:
    """Each tensor replaced, in place, by its mean over the ranks (one all_reduce for them all)."""
    size = world()[1]
    if size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= size
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (DTensor) gathered whole on every rank (a collective); others as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """`whole` laid out as `param` is: its shard of this rank when `param` is sharded (a DTensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements)
    return whole.to(param.device)


def mean_across_ranks(value: torch.Tensor) -> float:
    """The mean over ranks of a per-rank scalar (a weighted loss, to log the whole batch's)."""
    if world()[1] == 1:
        return value.item()
    total = value.detach().clone().reshape(1)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.item() / world()[1]


def agree(value: T) -> T:
    """Rank 0's `value` (JSON: a flag, a path) on every rank: a decision read from files, which only
    rank 0 may trust."""
    if world()[1] == 1:
        return value
    def broadcast(t: torch.Tensor) -> list[torch.Tensor]:
        dist.broadcast(t, src=0)
        return [t]

    return _json_tensors(value, broadcast)[0]


def _all_gather_json(value) -> list:
    """Every rank's `value` (JSON), in rank order."""
    def gather(t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(world()[1])]
        dist.all_gather(out, t)
        return out

    return _json_tensors(value, gather)


def _json_tensors(value, collective: Callable[[torch.Tensor], list[torch.Tensor]]) -> list:
    """Run `collective` on `value` as JSON bytes in a uint8 tensor (lengths first, so every rank's
    buffer fits) and decode what it returns. Not torch's *_object collectives: they pickle, and
    nothing here unpickles, not even from its own ranks."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    data = json.dumps(value).encode()
    length = torch.tensor([len(data)], device=device)
    longest = max(int(n) for n in collective(length))
    buffer = torch.zeros(longest, dtype=torch.uint8, device=device)
    fill = min(len(data), longest)  # a broadcast's receivers: theirs is overwritten anyway
    buffer[:fill] = torch.frombuffer(bytearray(data[:fill]), dtype=torch.uint8)
    return [json.loads(bytes(t.cpu().tolist()).rstrip(b"\0")) for t in collective(buffer)]


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def rank_zero_writes(write: Callable[[], T]) -> T | None:
    """Run `write` on rank 0 only; every rank returns once it is done (the others get None)."""
    result = write() if world()[0] == 0 else None
    barrier()
    return result


@contextmanager
def shared_temporary_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """One temporary folder for all ranks (made and removed by rank 0, its name broadcast)."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(agree(tempfile.mkdtemp(dir=parent, prefix=prefix) if world()[0] == 0 else None))
    try:
        yield path
        barrier()  # the others are done with it (on an error nobody waits: the ranks are stopping)
    finally:
        if world()[0] == 0:
            shutil.rmtree(path, ignore_errors=True)


def init_from_environment(device: str) -> bool:
    """Join the process group torchrun (or `launch`) describes in the environment, when WORLD_SIZE > 1:
    NCCL with one GPU per LOCAL_RANK on CUDA, gloo on CPU. True when a group was joined."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    cuda = torch.device(device).type == "cuda"
    if cuda:
        local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= count:
            raise ValueError(f"rank {local} of this machine has no GPU: it has {count} CUDA devices")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return True


def check_nproc(nproc: int, device: str) -> None:
    """One clear line for a world size the machine cannot give (before any process starts)."""
    if torch.device(device).type == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {nproc} is more than this machine's {torch.cuda.device_count()} CUDA devices")


def launch(nproc: int, argv: list[str], module: str) -> int:
    """Run `python -m module argv` as `nproc` ranks on this machine with torchrun's environment
    (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT; OMP threads shared out among the ranks) and
    return the first failing rank's exit status (0 when all succeed).

    Ours rather than torchrun's agent so that an error stays one line: rank 0 reports on the
    terminal; the other ranks' output is kept aside and shown only when one of them failed first.
    When a rank fails the others are stopped at once (they would wait for it in a collective)."""
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                        "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logs = [None] + [tempfile.TemporaryFile() for _ in range(1, nproc)]
    procs = [subprocess.Popen([sys.executable, "-m", module, *argv], env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=None if r == 0 else subprocess.DEVNULL, stderr=logs[r]) for r in range(nproc)]
    failed = None  # the first rank seen to fail
    try:
        while failed is None and None in (codes := [p.poll() for p in procs]):
            failed = next((r for r, code in enumerate(codes) if code not in (None, 0)), None)
            time.sleep(0.05)
        failed = failed if failed is not None else next((r for r, p in enumerate(procs) if p.returncode), None)
        status = 0 if failed is None else procs[failed].returncode
    except KeyboardInterrupt:  # the ranks got the same SIGINT from the terminal
        status, failed = 130, None
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT if failed is None else signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if failed:  # a rank other than 0: its own words, which rank 0 never saw
        logs[failed].seek(0)
        sys.stderr.write(logs[failed].read().decode(errors="replace"))
    for log in logs[1:]:
        log.close()
    return 128 - status if status < 0 else status  # killed by a signal: the shell's convention


def sum_across_ranks(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each tensor over the ranks in place, in a fixed key order every rank shares.

    The ranks must hold the same keys with the same shapes (checked by name first, so a mismatch
    is an error that names the keys, not a hang or a silently wrong sum)."""
    rank, size = world()
    if size == 1:
        return tensors
    names = sorted(tensors)
    for other, theirs in enumerate(_all_gather_json(names)):
        if theirs != names:
            raise RuntimeError(f"rank {rank} holds {names} but rank {other} holds {theirs}")
    for name in names:
        dist.all_reduce(tensors[name], op=dist.ReduceOp.SUM)
    return tensors
