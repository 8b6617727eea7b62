"""Causal attention over packed variable-length sequences: the one place attention is computed.

Sequences are packed without padding (q/k/v are [total_tokens, heads, head_dim]) and delimited
by `cu_seqlens` [batch+1], as flash-attn's varlen API takes them. flash-attn is used when it is
installed, the tensors are on CUDA and the kernel path allows it (`kernels.backend`;
imported lazily, once); otherwise torch's scaled_dot_product_attention, which runs everywhere.
Queries that read the engine's paged KV cache go through `cached_attention` instead
(`latent_cached_attention` when it holds LoRC latents).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kernels import backend_for, device_lens, latent_attention, paged_attention
from kernels.backend import FLASH_DTYPES
from kernels.paged_attention import sdpa, visible


@dataclass(frozen=True, slots=True)
class AttentionContext:
    """Per-step metadata shared by every layer, kept out of the model code (nano-vllm style)."""

    cu_seqlens: torch.Tensor  # int32 [batch+1], prefix sums of the sequence lengths
    seqlens: tuple[int, ...]  # the same lengths on the host: no device sync to read them
    max_seqlen: int
    # Paged KV cache (the engine); None for a cache-free pass over whole sequences.
    slot_mapping: torch.Tensor | None = None  # int64 [T]: cache slot (block * block_size + offset) per token
    block_tables: torch.Tensor | None = None  # int32 [batch, max_blocks], padded with 0
    context_lens: tuple[int, ...] | None = None  # tokens per sequence once this step's are added
    reads_cache: bool = False  # some sequence attends to keys computed in an earlier step
    context_lens_tensor: torch.Tensor | None = None  # the same lengths, int32 [batch] on the device

    @classmethod
    def from_lengths(cls, lengths: list[int] | tuple[int, ...], device: torch.device | str) -> AttentionContext:
        if not lengths or min(lengths) < 1:
            raise ValueError(f"every sequence needs at least one token, got lengths {list(lengths)}")
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
        return cls(cu_seqlens=cu.to(device), seqlens=tuple(lengths), max_seqlen=max(lengths))


@functools.cache
def _flash_attn_module():
    """flash-attn, or None when it is not installed (checked once)."""
    try:
        import flash_attn
    except ImportError:
        return None
    return flash_attn


def _flash(name: str, q: torch.Tensor):
    """flash-attn's `name` function where the kernel path has it for these queries (CUDA fp16/bf16), else None."""
    backend = backend_for(q.device)
    if not (backend.flash and q.is_cuda and q.dtype in FLASH_DTYPES):
        return None
    return getattr(_flash_attn_module(), name, None)


FLASH_PAGE_MULTIPLE = 256  # flash-attn's paged KV cache takes pages of a multiple of 256 tokens


def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: AttentionContext,
                     sliding_window: int | None = None,
                     scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """New queries [T, Hq, D] over the paged cache (their own K/V already written there) -> [T, Hq, D].

    flash-attn's paged decode when installed, on CUDA, with pages it accepts and a cache in q's dtype;
    otherwise `kernels.paged_attention` (the Triton decode kernel or the torch reference), which
    also read a float16 cache and an int8 one (`scales`: its K and V scale pools, kernels.kv_quant).
    The CPU serving form's attention (`engine.model.cpu_serving`) takes decode steps to the native
    kernel first.
    """
    flash = _flash("flash_attn_with_kvcache", q) if scales is None and k_cache.dtype == q.dtype else None
    decoding = ctx.max_seqlen == 1
    if flash is not None and decoding and k_cache.shape[1] % FLASH_PAGE_MULTIPLE == 0:
        lens = device_lens(ctx.context_lens, ctx.context_lens_tensor, q.device)
        window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
        out = flash(q[:, None], k_cache, v_cache, cache_seqlens=lens, block_table=ctx.block_tables, causal=True,
                    window_size=window)
        return out[:, 0]
    return paged_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, ctx.seqlens, sliding_window,
                           ctx.context_lens_tensor, scales)


def latent_cached_attention(q: torch.Tensor, ck_cache: torch.Tensor, cv_cache: torch.Tensor, k_up: torch.Tensor,
                            v_up: torch.Tensor, k_bias: torch.Tensor | None, v_bias: torch.Tensor | None,
                            inv_freq: torch.Tensor, ctx: AttentionContext,
                            sliding_window: int | None = None) -> torch.Tensor:
    """New queries [T, Hq, D] over a LoRC latent cache (keys rebuilt as c_k·A_kᵀ + b_k and rotated,
    values as c_v·A_vᵀ + b_v) -> [T, Hq, D], through `kernels.latent_attention`."""
    return latent_attention(q, ck_cache, cv_cache, k_up, v_up, k_bias, v_bias, inv_freq, ctx.block_tables,
                            ctx.context_lens, ctx.seqlens, sliding_window, ctx.context_lens_tensor)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, sliding_window: int | None = None
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]. GQA by head groups; token i of a sequence sees
    tokens j <= i of the same sequence with i - j < sliding_window (when set)."""
    flash = _flash("flash_attn_varlen_func", q)
    if flash is not None:
        window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
        return flash(
            q, k, v, ctx.cu_seqlens, ctx.cu_seqlens, ctx.max_seqlen, ctx.max_seqlen, causal=True, window_size=window
        )
    return _sdpa_varlen(q, k, v, ctx.seqlens, sliding_window)


def _sdpa_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: tuple[int, ...], sliding_window: int | None
) -> torch.Tensor:
    # Equal lengths (evaluation windows, uniform batches) go through one batched call; ragged
    # batches loop over sequences, which is what the paged engine replaces on the hot path.
    if len(set(seqlens)) == 1:
        n = len(seqlens)
        out = _causal_sdpa(q.unflatten(0, (n, -1)), k.unflatten(0, (n, -1)), v.unflatten(0, (n, -1)), sliding_window)
        return out.flatten(0, 1)
    parts = []
    for qs, ks, vs in zip(q.split(seqlens), k.split(seqlens), v.split(seqlens)):
        parts.append(_causal_sdpa(qs[None], ks[None], vs[None], sliding_window)[0])
    return torch.cat(parts)


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """q [B, L, Hq, D], k/v [B, L, Hkv, D] -> [B, L, Hq, D]: causal, within the window when set."""
    seq_len = q.shape[1]
    if sliding_window is None or seq_len <= sliding_window:
        return sdpa(q, k, v, causal=True)
    pos = torch.arange(seq_len, device=q.device)
    return sdpa(q, k, v, visible(pos, pos, sliding_window)[None])
