"""Decode attention over a LoRC latent cache vs attention over the full K/V cache, same run.

Run: `.venv/bin/python -m pytest bench/bench_latent_attention.py --benchmark-enable --benchmark-json=latent.json`,
then `.venv/bin/python bench/latent_report.py latent.json` (`bench/gpu.sh` does both).

One new query per sequence over contexts of 1k-16k tokens, batch 1 and 16, kv_ratio 0.5 (the
latents hold half the cache's bytes). Contenders:
- `latent`: `kernels.latent_attention` (the Triton kernel on a GPU, the torch reference on CPU);
- `sdpa`: torch's scaled_dot_product_attention over contiguous full K/V [B, Hkv, L, D] (what an
  engine without paging would run: the baseline the issue's 1.5x target is set against);
- `paged`: our paged decode over the full cache (`kernels.paged_attention`);
- `flash`: flash-attn's paged decode over the full cache, when installed (GPU only).
On CUDA each is a CUDA-graph replay of INNER calls; on CPU the suite times the torch paths and
skips what would take minutes there.
"""

from __future__ import annotations

import pytest
import torch
from timing import CUDA, INNER, timed

import kernels

DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float16 if CUDA else torch.float32
KV_RATIO = 0.5
BLOCK_SIZE = 16
SHAPES = {"llama3-8b": (32, 8, 128), "smollm2": (9, 3, 64)}  # Hq, Hkv, head_dim
CONTEXTS = [1024, 4096, 8192, 16384]
BATCHES = [1, 16]
CPU_TOKEN_CAP = 1 << 16  # batch × context above which the CPU run skips a case


def _flash():
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_with_kvcache


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("contender", ["latent", "sdpa", "paged", "flash"])
def test_decode_attention(benchmark, contender, shape, batch, context):
    if not CUDA and batch * context > CPU_TOKEN_CAP:
        pytest.skip(f"{batch} x {context} tokens: GPU-only case")
    if contender == "flash" and (not CUDA or _flash() is None):
        pytest.skip("flash-attn is not installed (or no GPU)")
    num_heads, num_kv_heads, head_dim = SHAPES[shape]
    width = num_kv_heads * head_dim
    rank = round((1 - KV_RATIO) * width)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(batch, num_heads, head_dim, device=DEVICE, generator=gen).to(DTYPE)
    page = 256 if contender == "flash" else BLOCK_SIZE
    blocks_per_seq = -(-context // page)
    tables = torch.randperm(batch * blocks_per_seq, device=DEVICE, generator=gen).int().view(batch, blocks_per_seq)
    lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    lens_host = (context,) * batch
    if contender == "latent":
        ck = torch.randn(batch * blocks_per_seq, page, rank, device=DEVICE, generator=gen).to(DTYPE)
        cv = torch.randn(batch * blocks_per_seq, page, rank, device=DEVICE, generator=gen).to(DTYPE)
        k_up = (torch.randn(width, rank, device=DEVICE, generator=gen) / rank**0.5).to(DTYPE)
        v_up = (torch.randn(width, rank, device=DEVICE, generator=gen) / rank**0.5).to(DTYPE)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim)
        cache_bytes = 2 * batch * context * rank * DTYPE.itemsize
        fn = lambda: kernels.latent_attention(q, ck, cv, k_up, v_up, None, None, inv_freq, tables,  # noqa: E731
                                              lens_host, (1,) * batch, None, lens)
    else:
        cache_bytes = 2 * batch * context * width * DTYPE.itemsize
        shape_kv = (batch * blocks_per_seq, page, num_kv_heads, head_dim)
        k_cache = torch.randn(shape_kv, device=DEVICE, generator=gen).to(DTYPE)
        v_cache = torch.randn(shape_kv, device=DEVICE, generator=gen).to(DTYPE)
        if contender == "sdpa":
            k = k_cache[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()  # (B, Hkv, L, D)
            v = v_cache[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
            fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                q[:, :, None], k, v, enable_gqa=num_heads != num_kv_heads)
        elif contender == "paged":
            fn = lambda: kernels.paged_attention(q, k_cache, v_cache, tables, lens_host, (1,) * batch,  # noqa: E731
                                                 None, lens)
        else:
            flash = _flash()
            fn = lambda: flash(q[:, None], k_cache, v_cache, cache_seqlens=lens, block_table=tables,  # noqa: E731
                               causal=True)
    benchmark.group = f"{shape} batch {batch} ctx {context}"
    benchmark.extra_info.update(contender=contender, shape=shape, batch=batch, context=context, rank=rank,
                                inner=INNER, cache_bytes=cache_bytes, dtype=str(DTYPE).removeprefix("torch."),
                                device=torch.cuda.get_device_name() if CUDA else f"cpu, {torch.get_num_threads()} threads",
                                triton=kernels.backend_for(q.device).name == "triton")
    with torch.inference_mode():
        benchmark.pedantic(timed(fn), rounds=20 if CUDA else 3, warmup_rounds=2 if CUDA else 1)
