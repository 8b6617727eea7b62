"""The engine's CPU kernels against what torch offers, same run: GEMMs and paged decode attention.

Run: `.venv/bin/python -m pytest bench/bench_cpu_kernels.py --benchmark-enable --benchmark-json=cpu.json`,
then `.venv/bin/python bench/cpu_kernels_report.py cpu.json` (writes bench/results/cpu-kernels-<device>.md).

GEMMs: every projection of LAYERS SmolLM2 layers (distinct weights, 53 MB dense in float32: more
than the L3, so weights stream from DRAM as in a decode step), dense and factorised at the ranks
of a 0.4 compression (60 % of each layer's parameters), through
- `native`: our C kernel (engine/cpu_gemm.c; a factorised layer is one fused call),
- `onednn`: oneDNN's inner product on pre-reordered weights (two calls per factorised layer),
- `torch`: `F.linear` on plain weights (MKL),
- `native-int8`, `native-int4`: our C kernel on the weights quantised as `lowrank quantize` stores
  them (int8 in groups of 64, int4 in groups of 32; 1 or 0.5 byte per weight plus the scales).
Attention: one new query per sequence over a paged cache, SmolLM2's heads, through the native
kernel (engine/cpu_attention.c) and the torch reference (`kernels.paged_attention_ref`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.cpu import build as cpu_native
from kernels.cpu.attention import native_paged_decode
from kernels.cpu.gemm import pack, pack_quantized, packed_linear, packed_lowrank
from kernels.paged_attention import paged_attention_ref
from kernels.quant import quantize

pytestmark = pytest.mark.skipif(cpu_native.library() is None, reason="the native CPU kernels could not be built")

HIDDEN, INTERMEDIATE, KV = 576, 1536, 192  # SmolLM2-135M
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
          (INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]  # q k v o gate up down
LAYERS = 4
KEEP = 0.6  # a 0.4 compression keeps 60 % of the parameters
ROWS = [1, 16, 64, 1024]


def _rank(out_f: int, in_f: int) -> int:
    return round(KEEP * out_f * in_f / (out_f + in_f))


@pytest.fixture(scope="module")
def weights():
    gen = torch.Generator().manual_seed(0)
    dense = [torch.randn(shape, generator=gen) for _ in range(LAYERS) for shape in SHAPES]
    factors = [(torch.randn(o, _rank(o, i), generator=gen), torch.randn(_rank(o, i), i, generator=gen))
               for _ in range(LAYERS) for o, i in SHAPES]
    return dense, factors


QUANTIZED = {"native-int8": (8, 64), "native-int4": (4, 32)}  # kernel -> (bits, group)
KERNELS = ["native", "onednn", "torch", *QUANTIZED]


def _pack(w: torch.Tensor, kernel: str):
    return pack_quantized(quantize(w, *QUANTIZED[kernel])) if kernel in QUANTIZED else pack(w, kernel)


def _calls(kernel: str, form: str, weights, rows: int):
    """[(fn, input)] for every projection, in the contender's own layout."""
    dense, factors = weights
    inputs = {n: torch.randn(rows, n) for n in (HIDDEN, INTERMEDIATE)}
    if form == "dense":
        if kernel == "torch":
            return [(lambda x, w=w: F.linear(x, w), inputs[w.shape[1]]) for w in dense]
        return [(lambda x, p=_pack(w, kernel): packed_linear(x, p), inputs[w.shape[1]]) for w in dense]
    if kernel == "torch":
        return [(lambda x, a=a, b=b: F.linear(F.linear(x, b), a), inputs[b.shape[1]]) for a, b in factors]
    return [(lambda x, pb=_pack(b, kernel), pa=_pack(a, kernel): packed_lowrank(x, pb, pa), inputs[b.shape[1]])
            for a, b in factors]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("form", ["dense", "lowrank"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_gemm(benchmark, weights, kernel, form, rows):
    calls = _calls(kernel, form, weights, rows)

    def run():
        for fn, x in calls:
            fn(x)

    benchmark.group = f"gemm rows={rows}"
    benchmark.extra_info.update(kind="gemm", kernel=kernel, form=form, rows=rows, layers=LAYERS,
                                threads=torch.get_num_threads())
    benchmark.pedantic(run, rounds=7, warmup_rounds=1)


@pytest.mark.parametrize("context", [128, 1024])
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_decode_attention(benchmark, kernel, batch, context):
    num_heads, num_kv_heads, head_dim, block = 9, 3, 64, 16
    gen = torch.Generator().manual_seed(0)
    blocks = -(-context // block)
    k_cache, v_cache = (torch.randn(batch * blocks, block, num_kv_heads, head_dim, generator=gen) for _ in range(2))
    tables = torch.randperm(batch * blocks, generator=gen).int().view(batch, blocks)
    q = torch.randn(batch, num_heads, head_dim, generator=gen)
    lens = torch.full((batch,), context, dtype=torch.int32)
    if kernel == "native":
        def run():
            native_paged_decode(q, k_cache, v_cache, tables, lens)
    else:
        def run():
            paged_attention_ref(q, k_cache, v_cache, tables, (context,) * batch, (1,) * batch)
    benchmark.group = f"decode attention batch={batch} context={context}"
    benchmark.extra_info.update(kind="attention", kernel=kernel, batch=batch, context=context,
                                threads=torch.get_num_threads())
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
