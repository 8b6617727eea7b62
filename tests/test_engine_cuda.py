"""On a GPU: the engine with captured CUDA graphs equals the eager engine token for token on a
real-shaped model (bench/synthetic.py's SmolLM2-135M, random weights), dense, factorised at
0.4 and with LoRC latents at kv 0.5, in fp16 and bf16. `bench/gpu.sh` runs it; CI has no GPU."""

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu.sh runs it)")

BENCH = Path(__file__).resolve().parents[1] / "bench"
VARIANTS = {"dense": {}, "r0.4": {"ratio": 0.4}, "r0.4-kv0.5": {"ratio": 0.4, "kv_ratio": 0.5}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    from synthetic import build

    out = tmp_path_factory.mktemp("synthetic")
    return lambda dtype, variant: build("smollm2-135m", out, dtype, device="cuda", **VARIANTS[variant])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_graphs_give_the_eager_tokens(models, dtype, variant):
    from engine import LLM, SamplingParams

    folder = models(dtype, variant)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in (5, 33, 17, 64, 2)]  # ragged; 5 of 8 slots
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    settings = dict(dtype=dtype, device="cuda", kv_cache_memory=1 << 30, max_num_seqs=8, max_model_len=256)
    # The reference runs the graph path's static, padded buffers eagerly: the same shapes, so the same
    # GEMM algorithms (plain eager decoding at 5 rows could round differently and flip a near-tie).
    reference = LLM(folder, cuda_graphs=False, **settings)
    reference.runner.use_static_decode()
    eager = [o.token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    del reference
    torch.cuda.empty_cache()
    llm = LLM(folder, cuda_graphs=True, **settings)
    assert llm.runner.graphs is not None, "the decode step was not captured: the backend refused it"
    replays = []
    run = llm.runner.graphs.run
    llm.runner.graphs.run = lambda *args: replays.append(len(args[0])) or run(*args)
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == eager
    assert replays, "no decode step replayed a graph"
