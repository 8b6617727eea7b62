"""Data-parallel calibration on a real gloo process group of 2 CPU processes against one process."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from conftest import save_tiny_model
from converters import data_parallel
from converters.calibrate import collect_grams
from engine import load_model

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
    mp.spawn(_in_group, args=(world_size, str(tmp_path / "rendezvous"), job, *args), nprocs=world_size)


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
