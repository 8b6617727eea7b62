"""Paged decode attention on CPU through the native kernel (kernels/cpu/attention.c).

The torch reference (`kernels.paged_attention_ref`) gathers padded copies of every sequence's K
and V and calls SDPA; the native kernel reads the cache in place through the block tables, an
order of magnitude faster at decode sizes (bench/results/cpu-kernels-cpu.md). It takes float32 or
float16 caches, or int8 ones with their float32 scale pools (kernels/kv_quant.py), with a head size
that is a multiple of HEAD_DIM_MULTIPLE (lowrank_cpu.h) and at most MAX_GROUP query heads per KV
head, as the library itself answers; anything else (or no C compiler) goes to the reference.
"""

from __future__ import annotations

import functools
import math

import torch

from kernels.cpu import build as cpu_native


def heads_supported(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the native kernel takes these head counts and head size (the library answers)."""
    lib = cpu_native.library()
    return lib is not None and _library_supports(lib, num_heads, num_kv_heads, head_dim)


@functools.cache
def _library_supports(lib, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """One ctypes call per library and shape, not one per decode step."""
    return bool(lib.lowrank_cpu_paged_decode_supports(num_heads, num_kv_heads, head_dim))


CACHE_BITS = {torch.float32: 32, torch.float16: 16, torch.int8: 8}  # the kernels' cache_bits per cache dtype


def cache_bits(k_cache: torch.Tensor, v_cache: torch.Tensor,
               scales: tuple[torch.Tensor, torch.Tensor] | None) -> int | None:
    """The kernels' cache_bits for these contiguous pools (an int8 cache with its float32 scale pools
    [blocks, block_size, Hkv], a float one without), or None where they read no such cache."""
    bits = CACHE_BITS.get(k_cache.dtype) if k_cache.dtype == v_cache.dtype else None
    if bits is None or (bits == 8) != (scales is not None):
        return None
    if scales is not None and not all(s.dtype == torch.float32 and s.shape == k_cache.shape[:3]
                                      and s.is_contiguous() for s in scales):
        return None
    return bits if k_cache.is_contiguous() and v_cache.is_contiguous() else None


def native_decode_applies(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> bool:
    """Whether the native kernel takes a decode step with queries q [B, Hq, D] over this cache
    (float32 or float16, or int8 with `scales`, its scale pools [blocks, block_size, Hkv])."""
    hq, d = q.shape[1], q.shape[2]
    hkv = k_cache.shape[2]
    return (q.device.type == "cpu" and q.dtype == torch.float32 and cache_bits(k_cache, v_cache, scales) is not None
            and k_cache.shape == v_cache.shape and k_cache.shape[3] == d and heads_supported(hq, hkv, d)
            and cpu_native.library() is not None)


def native_paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, sliding_window: int | None = None,
                        scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q [B, Hq, D] (one new query per sequence, its K/V already cached) -> [B, Hq, D].

    k_cache/v_cache [blocks, block_size, Hkv, D]; block_tables int [B, max_blocks];
    context_lens int [B], tokens per sequence including the new one; `scales`: an int8 cache's
    K and V scale pools [blocks, block_size, Hkv], None for a float32 or float16 one.
    """
    if not native_decode_applies(q, k_cache, v_cache, scales):
        raise ValueError(f"the native decode kernel does not take queries {tuple(q.shape)} {q.dtype} over a "
                         f"{k_cache.dtype} cache of {tuple(k_cache.shape)}")
    q, tables = q.contiguous(), block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    batch, hq, d = q.shape
    if tables.shape[0] != batch or lens.shape[0] != batch:
        raise ValueError(f"{batch} queries, {tables.shape[0]} block tables, {lens.shape[0]} context lengths")
    out = torch.empty_like(q)
    k_scales, v_scales = (s.data_ptr() for s in scales) if scales is not None else (None, None)
    status = cpu_native.library().lowrank_cpu_paged_decode(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), cache_bits(k_cache, v_cache, scales), k_scales, v_scales,
        tables.data_ptr(), tables.shape[1], lens.data_ptr(),
        batch, hq, k_cache.shape[2], d, k_cache.shape[1], k_cache.shape[0], sliding_window or 0, 1.0 / math.sqrt(d),
        out.data_ptr(), torch.get_num_threads())
    if status == -2:  # the kernel checks the tables before reading through them
        raise ValueError(f"context lengths {lens.tolist()} or their blocks lie outside the block tables "
                         f"({tables.shape[1]} blocks of {k_cache.shape[1]}) or the cache's {k_cache.shape[0]} blocks")
    if status != 0:  # unreachable after native_decode_applies; kept so a size mismatch never passes silently
        raise ValueError(f"the native decode kernel does not take {hq} query heads over {k_cache.shape[2]} KV heads "
                         f"of size {d}")
    return out
