"""Attention of new query tokens over a paged KV cache (decode steps, chunked prefills, prefix hits).

The cache is a pool of blocks, `k_cache`/`v_cache` [num_blocks, block_size, Hkv, D]; sequence
i's keys live in the blocks `block_tables[i]` lists, in token order. Its `query_lens[i]` new
tokens are the last ones of its `context_lens[i]` tokens (their K/V already written), so query
t of sequence i sits at position context_lens[i] - query_lens[i] + t and sees keys up to there.

`paged_attention_ref` is the plain-torch reference and CPU path: decoding sequences (one query
each) are gathered into one padded, masked SDPA call; longer queries go one sequence at a time.
`paged_decode_triton` is the Triton kernel for decode steps (one query per sequence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .interpreter import INTERPRET
from .kv_quant import dequantize_vectors


def _gather(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """cache [N, bs, *shape], table [..., nb] -> the first `length` tokens [..., length, *shape].

    `index_select` over whole blocks: on CPU it is 4x faster than advanced indexing `cache[blocks]`.
    """
    blocks = table[..., : -(-length // cache.shape[1])]
    gathered = cache.index_select(0, blocks.reshape(-1)).view(*blocks.shape[:-1], -1, *cache.shape[2:])
    return gathered.narrow(blocks.dim() - 1, 0, length)


def _gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, length: int,
               scales: tuple[torch.Tensor, torch.Tensor] | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the first `length` keys and values [..., length, Hkv, D] in `dtype`, an int8
    cache's dequantised with its scale pools, a float one of another dtype (float16) widened."""
    k, v = _gather(k_cache, table, length), _gather(v_cache, table, length)
    if scales is None:
        return k.to(dtype), v.to(dtype)
    return (dequantize_vectors(k, _gather(scales[0], table, length), dtype),
            dequantize_vectors(v, _gather(scales[1], table, length), dtype))


def visible(query_pos: torch.Tensor, key_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean [..., q, k]: causal, and within the window when there is one."""
    offset = query_pos[..., :, None] - key_pos[None, :]
    mask = offset >= 0
    return mask if sliding_window is None else mask & (offset < sliding_window)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
         causal: bool = False) -> torch.Tensor:
    """q [B, n, Hq, D], k/v [B, L, Hkv, D] -> [B, n, Hq, D] through torch's SDPA, GQA by head groups.
    `mask` [B or 1, n, L] (True: visible) or None: every key visible, or with `causal` (n == L) the
    causal pattern, SDPA's fastest path."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=None if mask is None else mask[:, None], is_causal=causal,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: tuple[int, ...],
    query_lens: tuple[int, ...],
    sliding_window: int | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] packed in sequence order, T = sum(query_lens) -> [T, Hq, D]; `scales`: an int8
    cache's K and V scale pools (kernels.kv_quant), else None."""
    assert q.shape[0] == sum(query_lens) and len(context_lens) == len(query_lens) == block_tables.shape[0]
    out = torch.empty_like(q)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    decoding = [i for i, n in enumerate(query_lens) if n == 1]
    if decoding:
        every = len(decoding) == len(query_lens)  # a pure decode step: no row selection needed
        rows = slice(None) if every else torch.tensor([starts[i] for i in decoding], device=q.device)
        lengths = [context_lens[i] for i in decoding]
        longest = max(lengths)
        table = block_tables if every else block_tables[torch.tensor(decoding, device=q.device)]
        k, v = _gather_kv(k_cache, v_cache, table, longest, scales, q.dtype)  # (B, L, Hkv, D), copies
        mask = None  # equal lengths and no window in reach: plain SDPA, its fastest path
        if min(lengths) < longest or (sliding_window is not None and longest > sliding_window):
            for row, n in enumerate(lengths):
                # Shorter sequences' padding holds stale slots. SDPA adds -inf to masked scores and
                # weighs V by 0, and a stale NaN survives both: zero them in the gathered copy.
                k[row, n:], v[row, n:] = 0, 0
            lens = torch.tensor(lengths, device=q.device)
            key_pos = torch.arange(longest, device=q.device)
            mask = visible((lens - 1)[:, None], key_pos, sliding_window) & (key_pos < lens[:, None])[:, None]
        if every:
            return sdpa(q[:, None], k, v, mask)[:, 0]
        out[rows] = sdpa(q[rows][:, None], k, v, mask)[:, 0]
    for i, n in enumerate(query_lens):
        if n == 1:
            continue
        length = context_lens[i]
        k, v = _gather_kv(k_cache, v_cache, block_tables[i], length, scales, q.dtype)
        key_pos = torch.arange(length, device=q.device)
        mask = visible(key_pos[length - n:], key_pos, sliding_window)
        out[starts[i]:starts[i + 1]] = sdpa(q[starts[i]:starts[i + 1]][None], k[None], v[None], mask[None])[0]
    return out


# -- Triton: decode (one query per sequence) -----------------------------------------------------
# One program per (sequence, KV head) holds the group's query heads as the rows of a `tl.dot`
# (vLLM's grouped decode layout), walks the sequence's keys BLOCK_N at a time through its block
# table with an online softmax, and writes the group's outputs once.
BLOCK_N = 64  # keys per iteration (several cache blocks)
MIN_ROWS = 16  # tl.dot needs 16 rows: the group's query heads are padded up to it
NO_WINDOW = 1 << 30  # "no sliding window": a window longer than any context


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, out_ptr, tables_ptr, lens_ptr,
    stride_qt, stride_qh, stride_slot, stride_kh, stride_scale_slot, stride_tb, stride_ot, stride_oh,
    scale, window,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, INT8: tl.constexpr,
):
    seq, kv_head = tl.program_id(0), tl.program_id(1)
    length = tl.load(lens_ptr + seq)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + offs_g
    in_group = offs_g < GROUP
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=in_group[:, None], other=0.0)  # (GROUP_PAD, HEAD_DIM)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
    first = tl.maximum(length - window, 0)  # the query at length-1 sees keys j > length-1-window
    for start in range((first // BLOCK_N) * BLOCK_N, length, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        valid = (offs_n < length) & (offs_n >= first)
        block = tl.load(tables_ptr + seq * stride_tb + offs_n // BLOCK_SIZE, mask=offs_n < length, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
        kv_offs = slot[:, None] * stride_slot + kv_head * stride_kh + offs_d[None, :]
        k = tl.load(k_ptr + kv_offs, mask=valid[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
        v = tl.load(v_ptr + kv_offs, mask=valid[:, None], other=0.0)
        if INT8:  # levels x their vector's scale (kernels.kv_quant), in the queries' dtype
            scale_offs = slot * stride_scale_slot + kv_head
            k_scale = tl.load(ks_ptr + scale_offs, mask=valid, other=0.0)
            v_scale = tl.load(vs_ptr + scale_offs, mask=valid, other=0.0)
            k = (k.to(tl.float32) * k_scale[:, None]).to(q.dtype)
            v = (v.to(tl.float32) * v_scale[:, None]).to(q.dtype)
        else:  # the queries' dtype: a float16 cache for float32 / bfloat16 queries, float32 under UPCAST
            k, v = k.to(q.dtype), v.to(q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * scale, float("-inf"))  # (GROUP_PAD, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=in_group[:, None])


def paged_decode_takes(head_dim: int) -> bool:
    """Head sizes the kernel takes: a power of two >= 16 (its tiles)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def paged_decode_supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Inputs the kernel takes: a head size it takes, contiguous cache, whole head groups."""
    return (paged_decode_takes(q.shape[-1]) and k_cache.is_contiguous() and q.shape[1] % k_cache.shape[2] == 0
            and q.stride(-1) == 1)


def paged_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    sliding_window: int | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q [B, Hq, D] (one new token per sequence), context_lens int32 [B] on q's device -> [B, Hq, D];
    `scales`: an int8 cache's K and V scale pools [blocks, block_size, Hkv] (kernels.kv_quant)."""
    if not paged_decode_supported(q, k_cache) or k_cache.shape != v_cache.shape or not v_cache.is_contiguous():
        raise ValueError(f"paged decode takes q [B, Hq, D] with D a power of two >= 16 and contiguous caches "
                         f"[blocks, block_size, Hkv, D]; got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}")
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    int8 = scales is not None
    if int8 and not (k_cache.dtype == v_cache.dtype == torch.int8 and all(
            s.shape == k_cache.shape[:3] and s.is_contiguous() and s.dtype == torch.float32 for s in scales)):
        raise ValueError(f"an int8 cache takes int8 pools and float32 scale pools {tuple(k_cache.shape[:3])}")
    out = torch.empty_like(q)
    upcast = INTERPRET and q.dtype == torch.bfloat16
    k_scales, v_scales = scales if int8 else (k_cache, v_cache)  # unread without INT8
    _paged_decode_kernel[(batch, num_kv_heads)](
        q, k_cache, v_cache, k_scales, v_scales, out, block_tables, context_lens,
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), k_scales.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        head_dim ** -0.5, sliding_window or NO_WINDOW,
        GROUP=group, GROUP_PAD=max(MIN_ROWS, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=BLOCK_N, UPCAST=upcast, IEEE=upcast or q.dtype == torch.float32, INT8=int8,
    )
    return out
