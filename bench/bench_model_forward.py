"""Prefill forward throughput of our model vs transformers' on the real SmolLM2-135M, same run.

Run: `.venv/bin/python -m pytest bench/bench_model_forward.py --benchmark-enable`
(pytest-benchmark groups the two so the ratio reads off one table).
"""

from pathlib import Path

import pytest
import torch

from engine import load_model

REPO = Path(__file__).resolve().parents[1]
BATCH, SEQ = 4, 512  # four evaluation windows of 512 tokens, as `lowrank eval` batches them


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from converters.pull import pull

    return pull("smollm2-135m", REPO / "models")


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 49152, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.mark.benchmark(group="prefill-4x512-fp32-cpu")
def test_ours(benchmark, model_dir, tokens):
    model = load_model(model_dir, dtype=torch.float32, device="cpu")

    @torch.inference_mode()
    def run():
        return [model.logits(h) for h in model.hidden_states(list(tokens))]

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    benchmark.extra_info["tokens_per_round"] = BATCH * SEQ


@pytest.mark.benchmark(group="prefill-4x512-fp32-cpu")
def test_transformers(benchmark, model_dir, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()

    @torch.inference_mode()
    def run():
        return model(tokens).logits

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    benchmark.extra_info["tokens_per_round"] = BATCH * SEQ
