"""Tensor-parallel serving's processes: rank 0 is the engine's own process (scheduler, sampler, API)
and every other rank a worker process that runs the model step rank 0 sends it, on its shard
(`engine.model.tensor_parallel`). nano-vllm's design: one process per device, started by the
engine with torch.multiprocessing (spawn) on one machine; the steps travel over torch.distributed
(one int64 tensor, `StepInputs.encode`), not pickled through shared memory.

Two groups. The model's collectives run on the default group (NCCL on CUDA, gloo on CPU) with a
bounded timeout: a rank that stops answering mid-step ends the step with an error, not a hang.
Workers wait for the next step on a second, gloo group whose timeout is long (the engine may be
idle for days); rank 0's death resets its sockets, so a worker never outlives it. Rank 0 checks
its workers before every step, and a failed collective names the rank that died; either way the
engine stops (`WorkerLost`) and its processes are freed.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.config import EngineConfig
from engine.model.config import ModelConfig, parse_dtype
from engine.model.llama import CausalLM
from engine.model.loader import default_device, default_dtype, load_model
from engine.model.tensor_parallel import check_tensor_parallel, shard_model

from .step_inputs import HEADER, StepInputs

STEP_TIMEOUT = timedelta(seconds=60)  # a collective waits this long for a rank that has stopped answering
IDLE_TIMEOUT = timedelta(days=365)  # workers wait for the next step as long as the engine is idle
JOIN_SECONDS = 10  # a worker told to stop has this long before it is terminated
STOP = -1  # a header's first value that ends the workers' loop


class WorkerLost(RuntimeError):
    """A tensor-parallel rank died or stopped answering: the engine cannot go on."""


def rank_device(device: str | torch.device | None, rank: int) -> torch.device:
    """Rank `rank`'s device: its own GPU (cuda:rank) on CUDA, the CPU otherwise."""
    device = torch.device(device) if device is not None else default_device()
    return torch.device("cuda", rank) if device.type == "cuda" else device


def load_shard(path: str | Path, dtype, device, ratio: float | None, kv_cache_dtype: str, rank: int,
               size: int) -> CausalLM:
    """The model as rank `rank` of `size` serves it: loaded whole on the CPU, cut into its shard,
    then moved to its device (so a model too big for one GPU is never on one), its K/V cached as
    `kv_cache_dtype`. One rank: `load_model` on the device itself."""
    target = rank_device(device, rank)
    if size == 1:
        model = load_model(path, dtype=dtype, device=target, ratio=ratio)
    else:
        dtype = parse_dtype(dtype) if dtype is not None else default_dtype(ModelConfig.from_folder(path), target)
        model = shard_model(load_model(path, dtype=dtype, device="cpu", ratio=ratio), rank, size).to(target)
        model.model.rotary.materialize(target)
        if model.model.layers[0].self_attn.latent:
            model.use_latent_kv()  # the layers' reference to the rotary frequencies, now on `target`
    model.use_kv_cache_dtype(kv_cache_dtype)
    return model


class Workers:
    """Rank 0's handle on ranks 1..size-1: starts them, joins their group, sends them each step."""

    def __init__(self, size: int, path: str | Path, dtype, device, ratio: float | None, config: EngineConfig):
        """Start ranks 1..size-1 as processes of this machine, or, under torchrun (WORLD_SIZE set), join
        the ranks torchrun started: there every rank runs the same program, and this call returns on
        rank 0 only; on the others it serves steps until rank 0 stops, then exits the process."""
        check_tensor_parallel(ModelConfig.from_folder(path), size)
        torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if torchrun and int(os.environ["WORLD_SIZE"]) != size:
            raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} processes for tensor_parallel_size {size}: "
                             "start as many as the size")
        rank, local = (int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))) if torchrun else (0, 0)
        target = rank_device(device, local)
        count = torch.cuda.device_count()
        if target.type == "cuda" and (local >= count if torchrun else size > count):
            raise ValueError(f"tensor_parallel_size {size} is more than the {count} CUDA devices this machine has")
        if dist.is_initialized():
            raise ValueError("tensor_parallel_size > 1 starts its own process group, and this process is in one "
                             "already (another tensor-parallel LLM): close that first")
        self.size, self.closed, self.procs = size, False, []
        self.threads = torch.get_num_threads()  # this process's, given back by close()
        threads = max(1, (os.cpu_count() or 1) // (int(os.environ.get("LOCAL_WORLD_SIZE", size)) if torchrun else size))
        if torchrun:
            self.control = _join(target, "env://", rank, size, threads)
            if rank != 0:
                _serve_steps(rank, size, str(path), dtype, target, ratio, config, self.control)
                sys.exit(0)
        else:
            address = f"tcp://127.0.0.1:{free_port()}"
            context = mp.get_context("spawn")
            self.procs = [context.Process(target=_worker_main, name=f"lowrank-tp-rank{r}", daemon=True,
                                          args=(r, size, address, str(path), dtype, str(target.type), ratio,
                                                asdict(config), threads))
                          for r in range(1, size)]
            for p in self.procs:
                p.start()
            try:
                self.control = _join(target, address, 0, size, threads)
            except BaseException as exc:
                raise WorkerLost(self._lost(exc)) from None
        atexit.register(self.close)

    def agree_blocks(self, num_blocks: int) -> int:
        """The fewest cache blocks any rank's budget holds: every rank allocates that many."""
        return _min_over_ranks(num_blocks, self.control)

    def ready(self) -> None:
        """Every rank has its runner (weights packed, cache allocated, graphs captured)."""
        dist.barrier(group=self.control)

    def send(self, step: StepInputs) -> None:
        """Tell every worker to run `step` (before rank 0 runs it itself)."""
        if dead := self._dead():
            raise WorkerLost(self._lost(None, dead))
        encoded = step.encode()
        dist.broadcast(encoded[:HEADER].clone(), src=0, group=self.control)
        dist.broadcast(encoded[HEADER:].clone(), src=0, group=self.control)

    def failure(self, exc: BaseException) -> WorkerLost:
        """A step's collective failed: the engine stops, its workers are freed, the error names why."""
        return WorkerLost(self._lost(exc))

    def close(self, graceful: bool = True) -> None:
        """Stop the workers and leave the group. Idempotent. Graceful (a built engine's end): they are
        told, then terminated after JOIN_SECONDS; otherwise (an engine that failed while being built,
        its workers perhaps inside another collective) terminated at once."""
        if self.closed:
            return
        self.closed = True
        if graceful:
            try:
                if not self._dead():
                    dist.broadcast(torch.full((HEADER,), STOP, dtype=torch.long), src=0, group=self.control)
            except Exception:  # a worker gone already: it needs no telling
                pass
            for p in self.procs:
                p.join(timeout=JOIN_SECONDS)
        self._terminate()
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self.threads)
        atexit.unregister(self.close)

    def _dead(self) -> list[tuple[int, int]]:
        return [(rank, p.exitcode) for rank, p in enumerate(self.procs, start=1) if p.exitcode is not None]

    def _lost(self, exc: BaseException | None, dead: list[tuple[int, int]] | None = None) -> str:
        """The engine's end in words (which rank died, waiting a moment for its exit to show, else
        the error); the workers are freed and the group left."""
        if dead is None:
            for p in self.procs:
                p.join(timeout=1)
            dead = self._dead()
        self.closed = True
        self._terminate()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a group broken by the failure: nothing left to leave
                pass
        torch.set_num_threads(self.threads)
        atexit.unregister(self.close)
        if dead:
            ranks = ", ".join(f"rank {rank} (exit code {code})" for rank, code in dead)
            return f"tensor-parallel worker {ranks} died: the engine has stopped"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0] if exc else "unknown"
        return f"a tensor-parallel step failed ({first}): the engine has stopped"

    def _terminate(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=JOIN_SECONDS)
            if p.is_alive():
                p.kill()
                p.join()


def _join(device: torch.device, address: str, rank: int, size: int, threads: int) -> dist.ProcessGroup:
    """Join the group (NCCL on CUDA, gloo on CPU; `address` a tcp:// rendezvous or env://) as `rank`,
    with this rank's share of the cores; -> the control group (gloo, the long timeout)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(threads)  # the process is one of the ranks sharing this machine's cores
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=address, rank=rank,
                            world_size=size, timeout=STEP_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def _worker_main(rank: int, size: int, address: str, path: str, dtype, device_type: str, ratio: float | None,
                 settings: dict, threads: int) -> None:
    """A worker process of this machine: join the group, serve steps, leave."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    device = rank_device(device_type, rank)
    control = _join(device, address, rank, size, threads)
    _serve_steps(rank, size, path, dtype, device, ratio, EngineConfig(**settings), control)


def _serve_steps(rank: int, size: int, path: str, dtype, device: torch.device, ratio: float | None,
                 config: EngineConfig, control: dist.ProcessGroup) -> None:
    """A worker rank: load its shard, build its runner like rank 0's, then run each step rank 0
    sends until told to stop; leaves the group. A failure (rank 0 gone: its sockets reset; or this
    rank's own) is printed and exits 1: rank 0, or torchrun, reports it."""
    from .kv_cache import plan_cache
    from .runner import ModelRunner

    try:
        model = load_shard(path, dtype, device, ratio, config.kv_cache_dtype, rank, size)
        plan = plan_cache(model, config)
        num_blocks = _min_over_ranks(plan.num_blocks, control)
        if num_blocks < plan.needed:
            return  # rank 0 reached the same count and raises the error that explains it
        runner = ModelRunner(model, num_blocks, config.block_size, None, config.max_num_seqs, plan.needed,
                             config.cuda_graphs, config.int8_activations)
        dist.barrier(group=control)
        while (step := _receive(control)) is not None:
            hidden = runner.execute(step)
            if step.rows:
                runner.logits(hidden)  # the head's gather to rank 0
    except Exception as exc:
        print(f"tensor-parallel rank {rank}: {type(exc).__name__}: {str(exc).strip()[:500]}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _receive(control: dist.ProcessGroup) -> StepInputs | None:
    header = torch.empty(HEADER, dtype=torch.long)
    dist.broadcast(header, src=0, group=control)
    if header[0] == STOP:
        return None
    payload = torch.empty(StepInputs.payload_size(header), dtype=torch.long)
    dist.broadcast(payload, src=0, group=control)
    return StepInputs.decode(torch.cat([header, payload]))


def _min_over_ranks(value: int, group: dist.ProcessGroup) -> int:
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t)


def free_port() -> int:
    """A TCP port free on loopback now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
