"""Data-parallel compression on real gloo process groups of 2 CPU processes against one process:
calibration, SoCo and healing steps, the `--nproc` launch through the CLI, and a dying rank."""

import json
import os
import subprocess
import sys
import tempfile
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from conftest import save_tiny_model, save_tiny_tokenizer
from converters import data_parallel
from converters.calibrate import collect_grams, decoder_linears
from converters.cli import main
from converters.factorize import whitened_svd
from converters.heal import HealConfig, heal
from converters.soco import SoCoConfig, train_scores
from engine import load_model
from engine.model.checkpoint import MANIFEST

CONFIG = LlamaConfig(vocab_size=89, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)


def _in_group(rank, world_size, init_file, job, *args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    try:
        job(rank, *args)
    finally:
        dist.destroy_process_group()


def _calibrate(rank, folder, windows_file, out):
    model = load_model(folder, device="cpu", dtype=torch.float64)
    windows = load_file(windows_file)["windows"]
    save_file(collect_grams(model, windows, batch_size=2, products=torch.float64), f"{out}/rank{rank}.safetensors")


def _sum_mismatched(rank):
    data_parallel.sum_across_ranks({f"only-on-{rank}": torch.ones(3)})


def _spawn(tmp_path, world_size, job, *args):
    """`job(rank, *args)` in each of `world_size` processes of a fresh group (its own rendezvous file:
    a sharded run's device mesh may keep the last one's alive)."""
    init = tempfile.mktemp(dir=tmp_path, prefix="rendezvous-")
    mp.spawn(_in_group, args=(world_size, init, job, *args), nprocs=world_size)


@pytest.mark.parametrize("samples", [7, 8])
def test_two_ranks_sum_to_the_grams_of_one_process(tmp_path, samples):
    folder = tmp_path / "model"
    save_tiny_model(CONFIG, folder)
    windows = torch.randint(0, CONFIG.vocab_size, (samples, 24))
    save_file({"windows": windows}, tmp_path / "windows.safetensors")
    _spawn(tmp_path, 2, _calibrate, str(folder), str(tmp_path / "windows.safetensors"), str(tmp_path))

    expected = collect_grams(load_model(folder, device="cpu", dtype=torch.float64), windows,
                             batch_size=2, products=torch.float64)
    for rank in range(2):
        got = load_file(tmp_path / f"rank{rank}.safetensors")
        assert got.keys() == expected.keys()
        for name, gram in expected.items():
            torch.testing.assert_close(got[name], gram, rtol=1e-12, atol=0)


def test_ranks_holding_different_tensors_raise_rather_than_hang(tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match="only-on-"):
        _spawn(tmp_path, 2, _sum_mismatched)


@pytest.mark.parametrize("samples, batch, size, expected", [
    (7, 2, 2, [range(0, 4), range(4, 7)]),
    (8, 2, 3, [range(0, 4), range(4, 6), range(6, 8)]),
    (5, 1, 2, [range(0, 3), range(3, 5)]),
    (3, 4, 1, [range(0, 3)]),
])
def test_shards_cover_the_windows_in_whole_batches(monkeypatch, samples, batch, size, expected):
    windows = torch.arange(samples)
    for rank in range(size):
        monkeypatch.setattr(data_parallel, "world", lambda rank=rank: (rank, size))
        assert data_parallel.shard(windows, batch).tolist() == list(expected[rank])


def test_fewer_batches_than_ranks_is_refused(monkeypatch):
    monkeypatch.setattr(data_parallel, "world", lambda: (0, 2))
    with pytest.raises(ValueError, match="1 batches of 4, too few to share among 2 ranks: use at least 8"):
        data_parallel.shard(torch.arange(3), 4)


# Training: a step of 2 ranks over a batch of 3 windows (shares of 2 and 1) equals one process's step.

STEPS = 6


def _soco(rank, folder, windows_file, out, fsdp=False):
    teacher = load_model(folder, device="cpu", dtype=torch.float32)
    factors = {name: whitened_svd(teacher.get_submodule(name).weight, None) for name in decoder_linears(teacher)}
    dense = sum(o * i for o, i in (f.shape for f in factors.values()))
    config = SoCoConfig(ratio=0.3, steps=STEPS, batch_size=3, seq_len=24, lr=3e-2, fsdp=fsdp)
    result = train_scores(teacher, factors, load_file(windows_file)["windows"], config, dense)
    save_file(result.scores, f"{out}/scores{rank}.safetensors")
    Path(f"{out}/history{rank}.json").write_text(json.dumps(result.history))


@pytest.mark.parametrize("fsdp", [False, True])  # replicated (DDP), or factors and teacher sharded (FSDP)
def test_two_ranks_train_the_soco_scores_of_one_process(tmp_path, fsdp):
    folder = tmp_path / "model"
    save_tiny_model(CONFIG, folder)
    windows = torch.randint(0, CONFIG.vocab_size, (12, 24))
    save_file({"windows": windows}, tmp_path / "windows.safetensors")
    _spawn(tmp_path, 2, _soco, str(folder), str(tmp_path / "windows.safetensors"), str(tmp_path), fsdp)
    torch.set_num_threads(1)  # as the ranks ran: the same kernels, so only the sums' order differs
    _soco("single", str(folder), str(tmp_path / "windows.safetensors"), str(tmp_path))
    expected = load_file(tmp_path / "scoressingle.safetensors")
    for rank in range(2):
        got = load_file(tmp_path / f"scores{rank}.safetensors")
        for name, key in expected.items():
            torch.testing.assert_close(got[name], key, rtol=0, atol=1e-4, msg=name)
        history = json.loads((tmp_path / f"history{rank}.json").read_text())
        single = json.loads((tmp_path / "historysingle.json").read_text())
        assert [h["stage"] for h in history] == [h["stage"] for h in single]
        assert [h["kl"] for h in history] == pytest.approx([h["kl"] for h in single], rel=1e-4)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A tiny dense model with a word-level tokenizer, a calibration text and its svd-llm compression."""
    root = tmp_path_factory.mktemp("dp")
    dense = root / "dense"
    save_tiny_model(CONFIG, dense)
    save_tiny_tokenizer(dense, CONFIG.vocab_size)
    calib = root / "calib.txt"
    ids = torch.randint(0, CONFIG.vocab_size, (6000,), generator=torch.Generator().manual_seed(3))
    calib.write_text(" ".join(f"t{i}" for i in ids.tolist()))
    out = root / "svdllm"
    assert main(["compress", str(dense), "--ratio", "0.3", "--method", "svd-llm", "--calib", str(calib),
                 "--samples", "8", "--seq-len", "32", "--out", str(out)]) == 0
    return {"dense": dense, "calib": calib, "svdllm": out, "root": root}


def _heal(rank, folder, calib, out, stop_after, fsdp=False, mode="full"):
    config = HealConfig(steps=STEPS, batch_size=3, seq_len=16, lr=3e-2, hidden_weight=0.5, max_ratio=0.5,
                        checkpoint_every=2, calib=calib, fsdp=fsdp, mode=mode)
    heal(folder, out, config, resume=True, stop_after=stop_after)


@pytest.mark.parametrize("first, then, mode", [
    (False, False, "full"),  # replicated (DistributedDataParallel)
    (True, True, "full"),  # sharded (FSDP): factors, gradients and Adam's moments split across the ranks
    (False, True, "lora"),  # a replicated run's checkpoint resumed sharded: it holds whole tensors
])
def test_two_ranks_heal_as_one_process_and_resume_from_rank_zeros_checkpoint(compressed, tmp_path, first, then,
                                                                           mode):
    args = (str(compressed["svdllm"]), str(compressed["calib"]))
    _spawn(tmp_path, 2, _heal, *args, str(tmp_path / "two"), 3, first, mode)  # stopped half-way: a checkpoint
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("two")) == ["two.partial"]
    _spawn(tmp_path, 2, _heal, *args, str(tmp_path / "two"), None, then, mode)  # resumed by both ranks
    torch.set_num_threads(1)
    _heal("single", *args, str(tmp_path / "one"), None, False, mode)
    got, expected = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    two, one = (json.loads((tmp_path / f / MANIFEST).read_text())["healing"] for f in ("two", "one"))
    assert two["resumed_at"] == 3 and one["resumed_at"] is None
    assert [h["kl"] for h in two["history"]] == pytest.approx([h["kl"] for h in one["history"]], rel=1e-4)
    assert not (tmp_path / "two.partial").exists()


# The CLI: `--nproc 2` starts two ranks that calibrate together and write one folder.

def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "converters.cli", *args], capture_output=True, text=True,
                          env=os.environ | (env or {}), cwd=Path(__file__).resolve().parents[1], timeout=300)


def test_nproc_2_compresses_the_folder_one_process_writes(compressed, tmp_path):
    common = ["compress", str(compressed["dense"]), "--ratio", "0.3", "--method", "svd-llm",
              "--calib", str(compressed["calib"]), "--samples", "8", "--seq-len", "32"]
    for run in ("a", "b"):
        done = _cli(*common, "--nproc", "2", "--out", str(tmp_path / run))
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("wrote ") == 1  # rank 0 reports, once
    got, again = (load_file(tmp_path / run / "model.safetensors") for run in ("a", "b"))
    assert all(torch.equal(got[name], again[name]) for name in got)  # same world size: the same bytes
    expected = load_file(compressed["svdllm"] / "model.safetensors")  # one process (the fixture)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    manifest = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert manifest["calibration"] == json.loads((compressed["svdllm"] / MANIFEST).read_text())["calibration"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary folder left by either rank


@pytest.mark.parametrize("args, message", [
    (["--method", "soco", "--batch-size", "1"], "--batch-size 1 cannot be shared among 2 ranks"),
    (["--device", "cuda"], "--nproc 2 is more than this machine's"),
])
def test_nproc_bad_sizes_exit_2_with_one_line(compressed, tmp_path, args, message):
    if "cuda" in args and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has two GPUs")
    done = _cli("compress", str(compressed["dense"]), "--ratio", "0.3", "--calib", str(compressed["calib"]),
                "--samples", "8", "--seq-len", "32", "--nproc", "2", *args, "--out", str(tmp_path / "x"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and message in done.stderr, done.stderr
    assert not (tmp_path / "x").exists()


def test_a_rank_that_dies_stops_the_others(tmp_path, monkeypatch):
    """Rank 1 is killed while rank 0 is busy outside any collective (gloo notices a dead peer only
    in the next one): the launcher stops rank 0 at once and reports the killed rank's status."""
    (tmp_path / "dying_rank.py").write_text(
        "import os, signal, time, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "if dist.get_rank() == 1:\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "time.sleep(600)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    result = []
    launcher = threading.Thread(target=lambda: result.append(data_parallel.launch(2, [], "dying_rank")), daemon=True)
    launcher.start()
    launcher.join(timeout=120)  # liveness, not speed: without the launcher's stop it would hang for 30 minutes
    assert result == [128 + 9]


def _student_shards(rank, folder, out):
    from torch.distributed.tensor import DTensor

    from converters.heal import build_student
    from engine.model.checkpoint import read_manifest

    student = build_student(Path(folder), read_manifest(folder), HealConfig(steps=4, fsdp=True))
    shards = {name: p.to_local().shape[0] for name, p in student.trained.items() if isinstance(p, DTensor)}
    whole = {name: p.shape[0] for name, p in student.trained.items()}
    Path(f"{out}/shards{rank}.json").write_text(json.dumps({"shards": shards, "whole": whole}))


def test_fsdp_gives_each_rank_a_share_of_every_trained_tensor(compressed, tmp_path):
    _spawn(tmp_path, 2, _student_shards, str(compressed["svdllm"]), str(tmp_path))
    ranks = [json.loads((tmp_path / f"shards{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["shards"].keys() == ranks[0]["whole"].keys()  # every trained tensor is sharded
    for name, rows in ranks[0]["whole"].items():
        assert ranks[0]["shards"][name] + ranks[1]["shards"][name] == rows
        assert ranks[0]["shards"][name] == -(-rows // 2)  # dim 0 split in two
