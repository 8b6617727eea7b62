"""Generation throughput: our engine (dense and compressed) vs transformers `generate`, same run.

Run: `.venv/bin/python -m pytest bench/bench_engine.py --benchmark-enable --benchmark-json=engine.json`,
then `.venv/bin/python bench/engine_report.py engine.json` (`bench/gpu.sh` does both on a GPU).

Fixed shapes so the contenders do the same work: PROMPT_LEN-token prompts (equal lengths, so
transformers needs no padding), exactly NEW_TOKENS new tokens each (greedy, EOS ignored), batch
1, 16 and 64. Two sets of models:
- default: the real SmolLM2-135M and its SoCo 0.4 compression (models/quality/soco-0.4 when
  `bench/quality.py` made it, else a quick conversion: its speed depends on its ranks, not on
  how long it trained);
- `BENCH_SYNTHETIC=DIR` (with `BENCH_SHAPE`, default llama3-8b): `bench/synthetic.py`'s random
  real-shaped folders under DIR, dense, factorised at 0.4 and with LoRC latents at kv 0.5
  (made there when missing): what a GPU machine without the real weights times.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float16 if CUDA else torch.float32
PROMPT_LEN, NEW_TOKENS = 64, 64
BATCHES = [1, 16, 64]
ROUNDS = 5  # the median of 5: this VM moves a contender by +-10 % between runs
SYNTHETIC = os.environ.get("BENCH_SYNTHETIC")
SHAPE = os.environ.get("BENCH_SHAPE", "llama3-8b")
OURS = ["ours-dense", "ours-r0.4", "ours-r0.4-kv0.5"] if SYNTHETIC else ["ours-dense", "ours-soco-0.4"]
# bench/gpu.sh on a machine whose disk holds the 8B shape's folders only one compressed one at a time
DISPOSABLE = SYNTHETIC is not None and os.environ.get("BENCH_SYNTHETIC_DISPOSABLE") == "1"
KV_CACHE_BYTES = 4 << 30  # per engine, several in one process: the default (90 % of free GPU memory) would not share


def dense_folder() -> Path:
    from converters.pull import pull

    return pull("smollm2-135m", REPO / "models")


def soco_folder(dense: Path) -> Path:
    """bench/quality.py's SoCo 0.4 folder where it exists, else a quick conversion (made once)."""
    folder = REPO / "models" / "quality" / "soco-0.4"
    if not (folder / "lowrank.json").is_file():
        folder = REPO / "models" / "bench-soco-0.4"
        if not (folder / "lowrank.json").is_file():
            from converters.compress import CompressConfig, compress

            calib = REPO.parent / "shared" / "corpus" / "pydocs" / "train.txt"
            compress(dense, folder, CompressConfig(ratio=0.4, method="soco", calib=str(calib), samples=16,
                                                   seq_len=256, steps=40))
    return folder


def _prompts(batch: int, vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    high = min(40000, vocab_size)
    return torch.randint(min(100, high // 2), high, (batch, PROMPT_LEN), generator=gen).tolist()


VARIANTS = {"ours-dense": {}, "ours-r0.4": {"ratio": 0.4}, "ours-r0.4-kv0.5": {"ratio": 0.4, "kv_ratio": 0.5}}


def synthetic_folder(name: str) -> Path:
    """Contender `name`'s folder of `bench/synthetic.py`'s SHAPE under BENCH_SYNTHETIC (made when missing,
    drawn on DEVICE)."""
    sys.path.insert(0, str(REPO / "bench"))
    from synthetic import build

    return build(SHAPE, Path(SYNTHETIC), DTYPE, device=DEVICE, **VARIANTS[name])


@pytest.fixture(scope="module")
def folders() -> dict[str, Callable[[], Path]]:
    """Contender -> how to get its folder; called one at a time, so disposable folders never coexist."""
    if SYNTHETIC:
        return {name: functools.partial(synthetic_folder, name) for name in VARIANTS}
    dense = functools.cache(dense_folder)
    return {"ours-dense": dense, "ours-soco-0.4": lambda: soco_folder(dense())}


@pytest.fixture(scope="module")
def dense_config(folders) -> dict:
    return json.loads((folders["ours-dense"]() / "config.json").read_text())


@pytest.fixture(scope="module")
def engines(folders):
    from engine import LLM

    settings = dict(dtype=DTYPE, device=DEVICE, max_model_len=PROMPT_LEN + NEW_TOKENS + 16, max_num_seqs=max(BATCHES),
                    max_num_batched_tokens=max(BATCHES) * PROMPT_LEN, enable_prefix_caching=False,
                    kv_cache_memory=KV_CACHE_BYTES if CUDA else None)
    engines = {}
    for name, folder_of in folders.items():
        folder = folder_of()
        engines[name] = LLM(folder, **settings)
        if DISPOSABLE and name != "ours-dense":  # loaded: its disk (or /dev/shm) space goes to the next one
            shutil.rmtree(folder)
    return engines


@pytest.fixture(scope="module")
def hf_model(folders):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folders["ours-dense"](), dtype=DTYPE).to(DEVICE).eval()


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("contender", [*OURS, "hf-dense"])
def test_generate(benchmark, request, contender, batch):
    from engine import SamplingParams

    prompts = _prompts(batch, request.getfixturevalue("dense_config")["vocab_size"])
    if contender == "hf-dense":
        model = request.getfixturevalue("hf_model")
        ids = torch.tensor(prompts, device=DEVICE)

        def run(new_tokens: int = NEW_TOKENS):
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            _sync()
    else:
        llm = request.getfixturevalue("engines")[contender]

        def run(new_tokens: int = NEW_TOKENS):
            params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
            outputs = llm.generate(prompts, params, use_tqdm=False)
            assert all(len(o.token_ids) == new_tokens for o in outputs)
            _sync()

    run(2)  # warm up: first-call allocations, kernel compilation
    ttfts = []
    for _ in range(ROUNDS):  # time to first token of the whole batch (the prefill): median of ROUNDS
        start = time.perf_counter()
        run(1)
        ttfts.append(time.perf_counter() - start)
    ttft = sorted(ttfts)[len(ttfts) // 2]
    benchmark.group = f"batch {batch}"
    benchmark.extra_info.update(contender=contender, batch=batch, prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS,
                                model=f"synthetic {SHAPE}" if SYNTHETIC else "smollm2-135m",
                                ttft_s=ttft, device=torch.cuda.get_device_name() if CUDA else
                                f"cpu, {torch.get_num_threads()} threads", dtype=str(DTYPE).removeprefix("torch."))
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=0)
