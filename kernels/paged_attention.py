"""Attention of new query tokens over a paged KV cache (decode steps, chunked prefills, prefix hits).

The cache is a pool of blocks, `k_cache`/`v_cache` [num_blocks, block_size, Hkv, D]; sequence
i's keys live in the blocks `block_tables[i]` lists, in token order. Its `query_lens[i]` new
tokens are the last ones of its `context_lens[i]` tokens (their K/V already written), so query
t of sequence i sits at position context_lens[i] - query_lens[i] + t and sees keys up to there.

`paged_attention_ref` is the plain-torch reference and CPU path: decoding sequences (one query
each) are gathered into one padded, masked SDPA call; longer queries go one sequence at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gather(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """cache [N, bs, H, D], table [..., nb] -> the first `length` tokens [..., length, H, D]."""
    blocks = table[..., : -(-length // cache.shape[1])]
    return cache[blocks].flatten(-4, -3)[..., :length, :, :]


def _visible(query_pos: torch.Tensor, key_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean [..., q, k]: causal, and within the window when there is one."""
    offset = query_pos[..., :, None] - key_pos[None, :]
    mask = offset >= 0
    return mask if sliding_window is None else mask & (offset < sliding_window)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, n, Hq, D], k/v [B, L, Hkv, D], mask [B, n, L] -> [B, n, Hq, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None], enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: tuple[int, ...],
    query_lens: tuple[int, ...],
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] packed in sequence order, T = sum(query_lens) -> [T, Hq, D]."""
    assert q.shape[0] == sum(query_lens) and len(context_lens) == len(query_lens) == block_tables.shape[0]
    out = torch.empty_like(q)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    decoding = [i for i, n in enumerate(query_lens) if n == 1]
    if decoding:
        rows = torch.tensor([starts[i] for i in decoding], device=q.device)
        lens = torch.tensor([context_lens[i] for i in decoding], device=q.device)
        longest = int(max(context_lens[i] for i in decoding))
        table = block_tables[torch.tensor(decoding, device=q.device)]
        k, v = _gather(k_cache, table, longest), _gather(v_cache, table, longest)  # (B, L, Hkv, D)
        key_pos = torch.arange(longest, device=q.device)
        mask = _visible((lens - 1)[:, None], key_pos, sliding_window) & (key_pos < lens[:, None])[:, None]
        out[rows] = _sdpa(q[rows][:, None], k, v, mask)[:, 0]
    for i, n in enumerate(query_lens):
        if n == 1:
            continue
        length = context_lens[i]
        k, v = _gather(k_cache, block_tables[i], length), _gather(v_cache, block_tables[i], length)
        key_pos = torch.arange(length, device=q.device)
        mask = _visible(key_pos[length - n:], key_pos, sliding_window)
        out[starts[i]:starts[i + 1]] = _sdpa(q[starts[i]:starts[i + 1]][None], k[None], v[None], mask[None])[0]
    return out
