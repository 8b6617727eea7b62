"""Low-rank GEMM: our dispatch vs two cuBLAS GEMMs vs the dense GEMM it replaces, same run.

Run: `.venv/bin/python -m pytest bench/bench_kernels.py --benchmark-enable --benchmark-json=kernels.json`,
then `.venv/bin/python bench/kernels_report.py kernels.json` for the table (`bench/gpu.sh` does both).

Shapes are real layers at ratio 0.4 (rank removing 40 % of the layer's parameters); M is the
number of token rows: 1-16 decode (memory-bound: GB/s), 64-2048 prefill (TFLOP/s).
On CUDA every contender is timed as a CUDA-graph replay of INNER calls, as the engine's decode
step will run, so Python launch overhead (tens of µs for two Triton launches) does not hide
the kernels' own time; on CPU the suite times the torch path directly, so it runs everywhere.
"""

from __future__ import annotations

import pytest
import torch
from timing import INNER, timed

import kernels

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float16 if CUDA else torch.float32
RATIO = 0.4
CPU_FLOP_CAP = 2e10  # dense FLOPs per call above which the CPU run skips a case (minutes, not seconds)

LAYERS = {  # name: (in, out)
    "llama3-8b.q": (4096, 4096),
    "llama3-8b.o": (4096, 4096),
    "llama3-8b.gate": (4096, 14336),
    "llama3-8b.up": (4096, 14336),
    "llama3-8b.down": (14336, 4096),
    "smollm2.q": (576, 576),
    "smollm2.k": (576, 192),
    "smollm2.gate": (576, 1536),
    "smollm2.down": (1536, 576),
}
ROWS = [1, 8, 16, 64, 512, 2048]


def rank_at_ratio(in_f: int, out_f: int, ratio: float = RATIO) -> int:
    return int((1 - ratio) * in_f * out_f / (in_f + out_f))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("contender", ["ours", "two-gemms", "dense"])
def test_lowrank_gemm(benchmark, contender, layer, m):
    in_f, out_f = LAYERS[layer]
    if not CUDA and 2 * m * in_f * out_f > CPU_FLOP_CAP:
        pytest.skip(f"{2 * m * in_f * out_f:.1e} FLOPs per call: GPU-only case")
    r = rank_at_ratio(in_f, out_f)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(m, in_f, device=DEVICE, generator=gen).to(DTYPE)
    A = (torch.randn(out_f, r, device=DEVICE, generator=gen) / r**0.5).to(DTYPE)
    B = (torch.randn(r, in_f, device=DEVICE, generator=gen) / in_f**0.5).to(DTYPE)
    size = DTYPE.itemsize
    io_bytes = m * (in_f + out_f) * size
    if contender == "dense":
        W = (A.float() @ B.float()).to(DTYPE)
        fn = lambda: x @ W.T  # noqa: E731
        weight_bytes, flops = in_f * out_f * size, 2 * m * in_f * out_f
    else:
        fn = (lambda: kernels.lowrank_gemm(x, A, B)) if contender == "ours" else (lambda: x @ B.T @ A.T)  # noqa: E731
        weight_bytes, flops = r * (in_f + out_f) * size, 2 * m * r * (in_f + out_f)
    benchmark.group = f"{layer} M={m}"
    benchmark.extra_info.update(contender=contender, layer=layer, m=m, rank=r, inner=INNER, flops=flops,
                                bytes=weight_bytes + io_bytes, dtype=str(DTYPE).removeprefix("torch."),
                                device=torch.cuda.get_device_name() if CUDA else f"cpu, {torch.get_num_threads()} threads",
                                triton=kernels.backend_for(x.device).runs_gemm(x))
    with torch.inference_mode():
        benchmark.pedantic(timed(fn), rounds=20 if CUDA else 3, warmup_rounds=2 if CUDA else 1)
