"""Tensor-parallel serving on 2 CPU processes (gloo) against one process: the sharded model's
logits (dense, GQA split and replicated, Qwen2's biases, factorised, LoRC latent K/V, int8 and
int4), the engine's greedy tokens and log-probs with prefix caching and preemption, a killed
worker, and sizes that cannot be cut."""

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, Qwen2Config

from conftest import save_tiny_model, save_tiny_tokenizer
from converters.compress import CompressConfig, compress
from converters.lorc import LoRCConfig, lorc
from converters.quantize import QuantConfig, quantize_folder
from engine import LLM, SamplingParams, load_model
from engine.core.workers import WorkerLost
from engine.model.tensor_parallel import RowParallelLowRank, check_tensor_parallel, shard_model

VOCAB = 89  # odd: the last rank's vocabulary shard is padded
LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256)


def _calib(folder: Path) -> Path:
    text = folder.parent / "calib.txt"
    ids = torch.randint(0, VOCAB, (6000,), generator=torch.Generator().manual_seed(5))
    text.write_text(" ".join(f"t{i}" for i in ids.tolist()))
    return text


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    made = {}
    for name, config in {
        "llama-gqa": LlamaConfig(**LLAMA, num_key_value_heads=2),  # KV heads split, one per rank
        "llama-mqa-untied": LlamaConfig(**LLAMA, num_key_value_heads=1, tie_word_embeddings=False),  # replicated
        "qwen2": Qwen2Config(**LLAMA, num_key_value_heads=2),  # q/k/v biases
    }.items():
        save_tiny_model(config, root / name)
        save_tiny_tokenizer(root / name, VOCAB)
        made[name] = root / name
    calib = _calib(made["llama-gqa"])
    made["factorised"] = root / "factorised"
    compress(made["llama-gqa"], made["factorised"],
             CompressConfig(ratio=0.3, method="svd-llm", calib=str(calib), samples=8, seq_len=32))
    made["latent"] = root / "latent"
    lorc(made["factorised"], made["latent"], LoRCConfig(kv_ratio=0.5, schedule="uniform", calib=str(calib),
                                                       samples=8, seq_len=32, probe_samples=2, probe_seq_len=32))
    for bits in (8, 4):  # groups of 32: the row-parallel cuts (32 of o_proj's 64 columns) keep whole groups
        made[f"int{bits}"] = root / f"int{bits}"
        quantize_folder(made["factorised"], made[f"int{bits}"], QuantConfig(bits=bits, group=32, rounding="rtn"))
    return made


def _sequences(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator) for n in (5, 11, 1)]


def _sharded_logits(rank, size, init_file, folder, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size,
                            timeout=timedelta(seconds=60))
    try:
        model = shard_model(load_model(folder, device="cpu", dtype=torch.float32), rank, size)
        logits = model.forward_sequences(_sequences())
        if rank == 0:
            save_file({str(i): t.contiguous() for i, t in enumerate(logits)}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mqa-untied", "qwen2", "factorised", "latent", "int8", "int4"])
def test_two_ranks_give_the_logits_of_one(folders, tmp_path, name):
    out = tmp_path / "logits.safetensors"
    mp.spawn(_sharded_logits, args=(2, str(tmp_path / "rendezvous"), str(folders[name]), str(out)), nprocs=2)
    got = load_file(out)
    expected = load_model(folders[name], device="cpu", dtype=torch.float32).forward_sequences(_sequences())
    for i, logits in enumerate(expected):
        assert got[str(i)].shape == logits.shape
        torch.testing.assert_close(got[str(i)], logits, rtol=1e-5, atol=2e-5)


def test_factorised_row_parallel_layers_reduce_their_rank_not_the_hidden_size(folders, tmp_path):
    """A factorised down_proj all_reduces r values per token (its rank), not `hidden`."""
    model = load_model(folders["factorised"], device="cpu", dtype=torch.float32)
    ranks = {name: m.rank for name, m in model.named_modules() if name.endswith("down_proj") and hasattr(m, "rank")}
    assert ranks and all(r < 64 for r in ranks.values())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        shard_model(model, 0, 1)  # a world of one changes nothing
        assert not any(isinstance(m, RowParallelLowRank) for m in model.modules())
    finally:
        dist.destroy_process_group()


# -- the engine ------------------------------------------------------------------------------------

PARAMS = SamplingParams(max_tokens=10, temperature=0, logprobs=3)


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(9)
    shared = torch.randint(2, VOCAB, (40,), generator=generator).tolist()  # a prefix two prompts share
    return [shared + [3, 4], torch.randint(2, VOCAB, (7,), generator=generator).tolist(), shared + [5],
            torch.randint(2, VOCAB, (23,), generator=generator).tolist()]


def _run(folder, **settings):
    outputs = []
    with LLM(folder, device="cpu", **settings) as llm:
        for prompts in (_prompts()[:2], _prompts()[2:]):  # the second batch finds the shared prefix cached
            outputs += llm.generate(prompts, PARAMS, use_tqdm=False)
        stats = {"cached": sum(o.num_cached_tokens for o in outputs), "preempted": llm.scheduler.num_preemptions}
    return outputs, stats


@pytest.mark.parametrize("name, blocks", [("llama-gqa", None), ("factorised", 5), ("latent", None)])
def test_two_rank_engine_generates_what_one_does(folders, name, blocks):
    """`blocks`: a cache of 5 blocks, too few for a 52- and a 17-token sequence at once, so the scheduler
    preempts (kv_cache_memory is per rank: a rank's shard caches half the bytes per token)."""
    one = {} if blocks is None else {"kv_cache_memory": blocks * 16 * 512, "max_model_len": 64}
    two = {} if blocks is None else {"kv_cache_memory": blocks * 16 * 256, "max_model_len": 64}
    expected, stats_one = _run(folders[name], **one)
    got, stats_two = _run(folders[name], tensor_parallel_size=2, **two)
    assert stats_two == stats_one
    assert stats_one["cached"] > 0
    if blocks is not None:
        assert stats_one["preempted"] > 0
    for a, b in zip(expected, got):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la.keys() == lb.keys()
            assert [lb[k] for k in la] == pytest.approx([la[k] for k in la], abs=1e-4)


def test_a_killed_worker_stops_the_engine_and_frees_its_processes(folders):
    llm = LLM(folders["llama-gqa"], device="cpu", tensor_parallel_size=2)
    worker = llm.workers.procs[0]
    llm.generate([[3, 4, 5]], PARAMS, use_tqdm=False)
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=30)
    with pytest.raises(WorkerLost, match=r"rank 1 \(exit code -9\) died"):
        llm.generate([[3, 4, 5]], PARAMS, use_tqdm=False)
    assert not any(p.is_alive() for p in llm.workers.procs)
    assert not dist.is_initialized()
    with pytest.raises(WorkerLost):  # stopped for good, not half-working
        llm.generate([[6]], PARAMS, use_tqdm=False)


def test_a_worker_killed_mid_step_fails_the_step_in_bounded_time(folders):
    """Killed while rank 0 waits for it in a collective: gloo's reset socket ends the wait."""
    llm = LLM(folders["llama-gqa"], device="cpu", tensor_parallel_size=2)
    worker = llm.workers.procs[0]
    send = llm.workers.send
    llm.workers.send = lambda step: (send(step), os.kill(worker.pid, signal.SIGKILL))  # after the step is sent
    started = time.monotonic()
    with pytest.raises(WorkerLost, match="rank 1"):
        llm.generate([[3, 4, 5]], PARAMS, use_tqdm=False)
    assert time.monotonic() - started < 60  # liveness (the step timeout), not speed
    assert not worker.is_alive()


@pytest.mark.parametrize("config, size, message", [
    (LlamaConfig(**LLAMA, num_key_value_heads=2), 3, "tensor_parallel_size 3 does not divide the model's 4 attention heads"),
    (LlamaConfig(**(LLAMA | {"num_attention_heads": 6, "hidden_size": 96}), num_key_value_heads=2), 3,
     "tensor_parallel_size 3 neither divides the model's 2 KV heads nor is a multiple of them"),
    (LlamaConfig(**(LLAMA | {"intermediate_size": 130}), num_key_value_heads=2), 4,
     "tensor_parallel_size 4 does not divide the model's intermediate size 130"),
])
def test_sizes_that_cannot_be_cut_are_refused_before_any_process_starts(tmp_path, config, size, message):
    save_tiny_model(config, tmp_path / "m")
    save_tiny_tokenizer(tmp_path / "m", VOCAB)
    from engine.model.config import ModelConfig

    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(ModelConfig.from_folder(tmp_path / "m"), size)
    started = mp.active_children()
    with pytest.raises(ValueError, match=message):
        LLM(tmp_path / "m", device="cpu", tensor_parallel_size=size)
    assert mp.active_children() == started and not dist.is_initialized()


def test_quantised_cuts_inside_a_group_are_refused(folders, tmp_path):
    """int8 groups of 64 across o_proj's 64 input columns: a cut at 32 would split a group's scale."""
    quantize_folder(folders["factorised"], tmp_path / "g64", QuantConfig(bits=8, group=64, rounding="rtn"))
    with pytest.raises(ValueError, match="splits groups of 64"):
        LLM(tmp_path / "g64", device="cpu", tensor_parallel_size=2)
    assert not dist.is_initialized()


def test_cli_serve_with_a_size_that_cannot_be_cut_exits_2_with_one_line(folders):
    done = subprocess.run([sys.executable, "-m", "converters.cli", "serve", str(folders["llama-gqa"]),
                           "--tensor-parallel-size", "3", "--port", "0", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "lowrank serve: error: tensor_parallel_size 3 does not divide the model's 4 attention heads"], done.stderr


def test_more_ranks_than_gpus_is_refused(folders):
    if torch.cuda.device_count() >= 4:
        pytest.skip("this machine has 4 GPUs")
    with pytest.raises(ValueError, match=f"tensor_parallel_size 4 is more than the {torch.cuda.device_count()} CUDA"):
        LLM(folders["llama-gqa"], device="cuda", tensor_parallel_size=4)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=240,
                          cwd=Path(__file__).resolve().parents[1])


def test_torchrun_ranks_generate_what_one_process_does(folders):
    """The same program on every rank: rank 0 runs the engine and prints, rank 1 serves its steps."""
    args = ["generate", str(folders["llama-gqa"]), "t5 t7 t9", "--max-tokens", "8", "--device", "cpu"]
    one = _cli("-m", "converters.cli", *args)
    two = _cli("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "converters.cli", *args,
               "--tensor-parallel-size", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout and one.stdout.strip()
    mismatched = _cli("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "converters.cli",
                      *args)
    assert mismatched.returncode != 0
    assert "lowrank generate: error: torchrun started 2 processes: give --tensor-parallel-size 2" in mismatched.stderr


def test_a_failure_on_rank_0_alone_while_building_frees_the_workers_at_once(folders, tmp_path):
    """Rank 0 alone reads the tokenizer: when it is damaged the workers are already waiting in a
    collective; they are terminated, not told (which would wait for them)."""
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(folders["llama-gqa"], folder)
    (folder / "tokenizer.json").write_text("{not json")
    started = time.monotonic()
    with pytest.raises(Exception, match="tokenizer"):
        LLM(folder, device="cpu", tensor_parallel_size=2)
    assert time.monotonic() - started < 30  # liveness: a told worker in the wrong collective waits JOIN_SECONDS+
    assert not mp.active_children() or all(not p.name.startswith("lowrank-tp") for p in mp.active_children())
    assert not dist.is_initialized()
