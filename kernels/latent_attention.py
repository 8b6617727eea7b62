"""Attention over a LoRC latent KV cache: keys rebuilt on chip with RoPE, values folded.

A LoRC layer caches, per token, the latents `c_k = B_k x` (r_k values) and `c_v = B_v x` (r_v)
instead of 2·Hkv·D keys and values: the cache moves (r_k + r_v) / (2·Hkv·D) of the bytes. Full
keys and values are `k = A_k c_k + b_k` and `v = A_v c_v + b_v` (`k_up` A_k [Hkv*D, r_k], `v_up`
A_v [Hkv*D, r_v], rows h*D:(h+1)*D for KV head h), and keys get RoPE (rotate-half, as HF Llama)
at their own position after the bias. Queries arrive already rotated.

The caches are paged like `paged_attention`'s: `ck_cache` [num_blocks, block_size, r_k] and
`cv_cache` [num_blocks, block_size, r_v], sequence i's tokens in the blocks `block_tables[i]`
lists, in order. `latent_attention_ref` is the plain-torch reference and CPU path: it rebuilds
dense K/V for the blocks in use and hands them to `paged_attention_ref`, so the masking (causal,
sliding window, ragged lengths, chunked prefills) is the tested one. `latent_decode_triton`
is the Triton kernel for decode steps: it rebuilds each head's keys in registers from the c_k
tile, rotates them with cos/sin of the keys' positions, and accumulates softmax·c_v in latent
space so A_v is applied once per head at the end (the weights sum to 1: b_v adds directly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .interpreter import INTERPRET
from .paged_attention import MIN_ROWS, NO_WINDOW, paged_attention_ref


def rebuild_kv(
    ck: torch.Tensor,
    cv: torch.Tensor,
    k_up: torch.Tensor,
    v_up: torch.Tensor,
    k_bias: torch.Tensor | None,
    v_bias: torch.Tensor | None,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents [..., T, r_k], [..., T, r_v] at positions [T] -> k (RoPE applied), v [..., T, Hkv, D].

    In the latents' dtype; cos/sin in fp32 from positions·inv_freq, then cast, as engine/rope.py does.
    """
    k = F.linear(ck, k_up, k_bias).unflatten(-1, (num_kv_heads, -1))  # (..., T, Hkv, D)
    v = F.linear(cv, v_up, v_bias).unflatten(-1, (num_kv_heads, -1))
    freqs = positions.to(inv_freq.device).float()[:, None] * inv_freq.float()[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, D): broadcast over heads
    half = k.shape[-1] // 2
    rotated = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    return k * emb.cos().to(k.dtype) + rotated * emb.sin().to(k.dtype), v


def latent_attention_ref(
    q: torch.Tensor,
    ck_cache: torch.Tensor,
    cv_cache: torch.Tensor,
    k_up: torch.Tensor,
    v_up: torch.Tensor,
    k_bias: torch.Tensor | None,
    v_bias: torch.Tensor | None,
    inv_freq: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: tuple[int, ...],
    query_lens: tuple[int, ...],
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] packed in sequence order, T = sum(query_lens) -> [T, Hq, D]; `paged_attention_ref`'s contract.

    One dense block per (sequence, table index) in use: a block shared by several tables (a prefix
    hit) sits at the same index in each, so at the same positions; rebuilding it twice is exact.
    """
    assert len(context_lens) == len(query_lens) == block_tables.shape[0]
    block_size = ck_cache.shape[1]
    widths = [-(-n // block_size) for n in context_lens]
    used = torch.cat([block_tables[i, :w] for i, w in enumerate(widths)]).to(ck_cache.device, torch.long)  # (U,)
    index = torch.cat([torch.arange(w) for w in widths])  # each used block's index in its table
    positions = (index[:, None] * block_size + torch.arange(block_size)).flatten()  # (U*bs,)
    k, v = rebuild_kv(ck_cache.index_select(0, used).flatten(0, 1), cv_cache.index_select(0, used).flatten(0, 1),
                      k_up, v_up, k_bias, v_bias, positions, inv_freq, k_up.shape[0] // q.shape[-1])
    starts = [sum(widths[:i]) for i in range(len(widths))]
    tables = torch.tensor([list(range(s, s + w)) + [0] * (max(widths) - w) for s, w in zip(starts, widths)],
                          dtype=torch.int32, device=q.device)
    return paged_attention_ref(q, k.unflatten(0, (-1, block_size)), v.unflatten(0, (-1, block_size)), tables,
                               context_lens, query_lens, sliding_window)


# -- Triton: decode (one query per sequence) -----------------------------------------------------
# One program per (sequence, KV head), as `_paged_decode_kernel`: the group's query heads are the
# rows of a `tl.dot`, the sequence's latents are walked BLOCK_N tokens at a time through its block
# table with an online softmax. Keys are rebuilt transposed, as the two rotate-half halves
# [D/2, BLOCK_N], from c_k in rank chunks; values stay latent until the end.
TILE_BYTES = 32 << 10  # c_v [BLOCK_N, r_v] and A_v [r_v, OUT_CHUNK] tiles: BLOCK_N shrinks as r_v grows
MAX_BLOCK_N = 64  # latent tokens per iteration
RANK_CHUNK = 64  # c_k ranks per key-rebuild dot: A_k's [D/2, chunk] tiles stay small for any r_k
NUM_STAGES = 2  # pipelining depth of the rank loop: each stage holds a c_k tile and two A_k tiles


@triton.jit
def _latent_decode_kernel(
    q_ptr, ck_ptr, cv_ptr, ak_ptr, av_ptr, bk_ptr, bv_ptr, freq_ptr, out_ptr, tables_ptr, lens_ptr,
    stride_qt, stride_qh, stride_ck, stride_cv, stride_ak, stride_av, stride_tb, stride_ot, stride_oh,
    rank_k, rank_v, scale, window,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, K_CHUNK: tl.constexpr, R_V_PAD: tl.constexpr, OUT_CHUNK: tl.constexpr,
    HAS_K_BIAS: tl.constexpr, HAS_V_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    seq, kv_head = tl.program_id(0), tl.program_id(1)
    length = tl.load(lens_ptr + seq)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_h = tl.arange(0, HALF)
    offs_kr = tl.arange(0, K_CHUNK)
    offs_vr = tl.arange(0, R_V_PAD)
    heads = kv_head * GROUP + offs_g
    in_group = offs_g < GROUP
    q_rows = q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_h[None, :]
    q1 = tl.load(q_rows, mask=in_group[:, None], other=0.0)  # (GROUP_PAD, HALF)
    q2 = tl.load(q_rows + HALF, mask=in_group[:, None], other=0.0)
    if UPCAST:
        q1, q2 = q1.to(tl.float32), q2.to(tl.float32)
    rows1 = kv_head * HEAD_DIM + offs_h  # this head's A_k rows: first half, then second half at +HALF
    inv_freq = tl.load(freq_ptr + offs_h)  # (HALF,) fp32
    if HAS_K_BIAS:
        bk1 = tl.load(bk_ptr + rows1).to(tl.float32)
        bk2 = tl.load(bk_ptr + rows1 + HALF).to(tl.float32)
    in_rank_v = offs_vr < rank_v
    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, R_V_PAD), dtype=tl.float32)  # softmax · c_v, in latent space
    first = tl.maximum(length - window, 0)  # the query at length-1 sees keys j > length-1-window
    for start in range((first // BLOCK_N) * BLOCK_N, length, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        valid = (offs_n < length) & (offs_n >= first)
        block = tl.load(tables_ptr + seq * stride_tb + offs_n // BLOCK_SIZE, mask=offs_n < length, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
        # keys, transposed: k1ᵀ = A_k[h*D : h*D+D/2] · c_kᵀ and k2ᵀ likewise, (HALF, BLOCK_N) each
        k1 = tl.zeros((HALF, BLOCK_N), dtype=tl.float32)
        k2 = tl.zeros((HALF, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank_k, K_CHUNK):
            ranks = r0 + offs_kr
            in_rank = ranks < rank_k
            ck = tl.load(ck_ptr + slot[None, :] * stride_ck + ranks[:, None],
                         mask=in_rank[:, None] & valid[None, :], other=0.0)  # (K_CHUNK, BLOCK_N)
            a_offs = rows1[:, None] * stride_ak + ranks[None, :]
            a1 = tl.load(ak_ptr + a_offs, mask=in_rank[None, :], other=0.0)  # (HALF, K_CHUNK)
            a2 = tl.load(ak_ptr + a_offs + HALF * stride_ak, mask=in_rank[None, :], other=0.0)
            if UPCAST:
                ck, a1, a2 = ck.to(tl.float32), a1.to(tl.float32), a2.to(tl.float32)
            if IEEE:
                k1 = tl.dot(a1, ck, k1, input_precision="ieee")
                k2 = tl.dot(a2, ck, k2, input_precision="ieee")
            else:
                k1 = tl.dot(a1, ck, k1)
                k2 = tl.dot(a2, ck, k2)
        if HAS_K_BIAS:
            k1, k2 = k1 + bk1[:, None], k2 + bk2[:, None]
        freqs = inv_freq[:, None] * offs_n[None, :].to(tl.float32)  # (HALF, BLOCK_N): RoPE at each key's position
        cos, sin = tl.cos(freqs), tl.sin(freqs)
        r1 = (k1 * cos - k2 * sin).to(q1.dtype)
        r2 = (k2 * cos + k1 * sin).to(q1.dtype)
        if IEEE:
            s = tl.dot(q2, r2, tl.dot(q1, r1, input_precision="ieee"), input_precision="ieee")
        else:
            s = tl.dot(q2, r2, tl.dot(q1, r1))
        s = tl.where(valid[None, :], s * scale, float("-inf"))  # (GROUP_PAD, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        cv = tl.load(cv_ptr + slot[:, None] * stride_cv + offs_vr[None, :],
                     mask=valid[:, None] & in_rank_v[None, :], other=0.0)  # (BLOCK_N, R_V_PAD)
        if UPCAST:
            cv = cv.to(tl.float32)
        if IEEE:
            acc = tl.dot(p, cv, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(cv.dtype), cv, acc * alpha[:, None])
        m_i = m_new
    o = acc / l_i[:, None]  # (GROUP_PAD, R_V_PAD): softmax-weighted latent
    if not UPCAST:
        o = o.to(av_ptr.dtype.element_ty)
    # out = o · A_v[h*D:(h+1)*D]ᵀ (+ b_v), OUT_CHUNK output columns at a time
    for d0 in tl.static_range(0, HEAD_DIM, OUT_CHUNK):
        cols = kv_head * HEAD_DIM + d0 + tl.arange(0, OUT_CHUNK)
        av = tl.load(av_ptr + cols[None, :] * stride_av + offs_vr[:, None], mask=in_rank_v[:, None],
                     other=0.0)  # (R_V_PAD, OUT_CHUNK)
        if UPCAST:
            av = av.to(tl.float32)
        if IEEE:
            out = tl.dot(o, av, input_precision="ieee")
        else:
            out = tl.dot(o, av)
        if HAS_V_BIAS:
            out += tl.load(bv_ptr + cols).to(tl.float32)[None, :]
        out_offs = seq * stride_ot + heads[:, None] * stride_oh + d0 + tl.arange(0, OUT_CHUNK)[None, :]
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=in_group[:, None])


MAX_RANK_V = 1024  # acc [GROUP_PAD, r_v] stays whole in registers: larger value latents go to the reference


def latent_decode_takes(head_dim: int) -> bool:
    """Head sizes the kernel takes: a power of two >= 32 (RoPE halves of at least 16)."""
    return head_dim >= 32 and head_dim & (head_dim - 1) == 0


def latent_decode_supported(q: torch.Tensor, ck_cache: torch.Tensor, k_up: torch.Tensor | None = None,
                            rank_v: int = 0) -> bool:
    """Inputs the kernel takes: a head size it takes, contiguous cache, whole head groups, value rank
    up to MAX_RANK_V."""
    head_dim = q.shape[-1]
    ok = (q.dim() == 3 and latent_decode_takes(head_dim) and q.stride(-1) == 1
          and ck_cache.dim() == 3 and ck_cache.is_contiguous() and rank_v <= MAX_RANK_V)
    if ok and k_up is not None:
        ok = (k_up.dim() == 2 and k_up.shape[0] >= head_dim and k_up.shape[0] % head_dim == 0
              and q.shape[1] % (k_up.shape[0] // head_dim) == 0)
    return ok


def latent_decode_refusal(q, ck_cache, cv_cache, k_up, v_up, k_bias, v_bias, inv_freq) -> str | None:
    """Why the kernel cannot take these inputs, naming the shapes; None when it can."""
    width = k_up.shape[0] if k_up.dim() == 2 else -1
    fits = (latent_decode_supported(q, ck_cache, k_up, cv_cache.shape[-1]) and cv_cache.dim() == 3
            and cv_cache.is_contiguous()
            and cv_cache.shape[:2] == ck_cache.shape[:2] and v_up.dim() == 2
            and k_up.shape == (width, ck_cache.shape[2]) and v_up.shape == (width, cv_cache.shape[2])
            and k_up.stride(1) == 1 and v_up.stride(1) == 1
            and all(b is None or (b.shape == (width,) and b.is_contiguous()) for b in (k_bias, v_bias))
            and inv_freq.shape == (q.shape[-1] // 2,) and inv_freq.dtype == torch.float32)
    if not fits:
        bias = [None if b is None else tuple(b.shape) for b in (k_bias, v_bias)]
        return (f"latent decode takes q [B, Hq, D] with D a power of two >= 32 and Hq a multiple of Hkv, contiguous "
                f"caches ck [blocks, block_size, r_k] and cv [blocks, block_size, r_v <= {MAX_RANK_V}], k_up "
                f"[Hkv*D, r_k], v_up "
                f"[Hkv*D, r_v], biases [Hkv*D] or None, inv_freq [D/2] float32; got q {tuple(q.shape)}, ck_cache "
                f"{tuple(ck_cache.shape)}, cv_cache {tuple(cv_cache.shape)}, k_up {tuple(k_up.shape)}, v_up "
                f"{tuple(v_up.shape)}, k_bias {bias[0]}, v_bias {bias[1]}, inv_freq {tuple(inv_freq.shape)} "
                f"{inv_freq.dtype}")
    dtypes = {t.dtype for t in (q, ck_cache, cv_cache, k_up, v_up, k_bias, v_bias) if t is not None}
    if len(dtypes) > 1:
        return f"latent decode takes q, caches, k_up/v_up and biases in one dtype; got {sorted(map(str, dtypes))}"
    return None


def latent_decode_triton(
    q: torch.Tensor,
    ck_cache: torch.Tensor,
    cv_cache: torch.Tensor,
    k_up: torch.Tensor,
    v_up: torch.Tensor,
    k_bias: torch.Tensor | None,
    v_bias: torch.Tensor | None,
    inv_freq: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, D] (one new token per sequence), context_lens int32 [B] on q's device -> [B, Hq, D]."""
    problem = latent_decode_refusal(q, ck_cache, cv_cache, k_up, v_up, k_bias, v_bias, inv_freq)
    if problem:
        raise ValueError(problem)
    batch, num_heads, head_dim = q.shape
    block_size, rank_k, rank_v = ck_cache.shape[1], ck_cache.shape[2], cv_cache.shape[2]
    num_kv_heads = k_up.shape[0] // head_dim
    r_v_pad = max(MIN_ROWS, triton.next_power_of_2(rank_v))
    tile = TILE_BYTES // q.element_size() // r_v_pad  # BLOCK_N and OUT_CHUNK before clamping
    out = torch.empty_like(q)
    upcast = INTERPRET and q.dtype == torch.bfloat16
    _latent_decode_kernel[(batch, num_kv_heads)](
        q, ck_cache, cv_cache, k_up, v_up, k_up if k_bias is None else k_bias, v_up if v_bias is None else v_bias,
        inv_freq, out, block_tables, context_lens,
        q.stride(0), q.stride(1), ck_cache.stride(1), cv_cache.stride(1), k_up.stride(0), v_up.stride(0),
        block_tables.stride(0), out.stride(0), out.stride(1),
        rank_k, rank_v, head_dim ** -0.5, sliding_window or NO_WINDOW,
        GROUP=num_heads // num_kv_heads, GROUP_PAD=max(MIN_ROWS, triton.next_power_of_2(num_heads // num_kv_heads)),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_N=max(MIN_ROWS, min(MAX_BLOCK_N, tile)),
        K_CHUNK=max(MIN_ROWS, min(RANK_CHUNK, triton.next_power_of_2(rank_k))), R_V_PAD=r_v_pad,
        OUT_CHUNK=max(MIN_ROWS, min(head_dim, tile)),
        HAS_K_BIAS=k_bias is not None, HAS_V_BIAS=v_bias is not None, UPCAST=upcast,
        IEEE=upcast or q.dtype == torch.float32, num_stages=NUM_STAGES,
        num_warps=8 if max(MIN_ROWS, num_heads // num_kv_heads) * r_v_pad >= 8192 else 4,  # spread a wide acc
    )
    return out
