"""Generation throughput: our engine (dense and SoCo 0.4) vs transformers `generate`, same run.

Run: `.venv/bin/python -m pytest bench/bench_engine.py --benchmark-enable --benchmark-json=engine.json`,
then `.venv/bin/python bench/engine_report.py engine.json` (`bench/gpu.sh` does both on a GPU).

Fixed shapes so the contenders do the same work: PROMPT_LEN-token prompts (equal lengths, so
transformers needs no padding), exactly NEW_TOKENS new tokens each (greedy, EOS ignored), batch
1, 16 and 64. The compressed model is models/quality/soco-0.4 when `bench/quality.py` made it,
else a quick SoCo 0.4 conversion (its speed depends on its ranks, not on how long it trained).
"""

from __future__ import annotations

import time
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


@pytest.fixture(scope="module")
def dense_dir() -> Path:
    return dense_folder()


@pytest.fixture(scope="module")
def soco_dir(dense_dir) -> Path:
    return soco_folder(dense_dir)


def _prompts(batch: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    return torch.randint(100, 40000, (batch, PROMPT_LEN), generator=gen).tolist()


@pytest.fixture(scope="module")
def engines(dense_dir, soco_dir):
    from engine import LLM

    settings = dict(dtype=DTYPE, device=DEVICE, max_model_len=PROMPT_LEN + NEW_TOKENS + 16, max_num_seqs=max(BATCHES),
                    max_num_batched_tokens=max(BATCHES) * PROMPT_LEN, enable_prefix_caching=False)
    return {"ours-dense": LLM(dense_dir, **settings), "ours-soco-0.4": LLM(soco_dir, **settings)}


@pytest.fixture(scope="module")
def hf_model(dense_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(dense_dir, dtype=DTYPE).to(DEVICE).eval()


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("contender", ["ours-dense", "ours-soco-0.4", "hf-dense"])
def test_generate(benchmark, request, contender, batch):
    from engine import SamplingParams

    prompts = _prompts(batch)
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
                                ttft_s=ttft, device=torch.cuda.get_device_name() if CUDA else
                                f"cpu, {torch.get_num_threads()} threads", dtype=str(DTYPE).removeprefix("torch."))
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=0)
