"""The kernels and their one dispatch; imports only torch and triton (and ctypes under `cpu/`).

Each Triton kernel sits beside its plain-torch reference (`lowrank_gemm.py`, `paged_attention.py`,
`latent_attention.py`: the launchers are `*_triton`, the references `*_ref`); the native C
kernels that stand in for them on CPUs are under `cpu/`. The dispatchers here keep the plain
names: `lowrank_gemm` (the engine's `LowRankLinear`, the SoCo and healing trainers),
`quantized_linear` / `quantized_lowrank` (the same with int8 / int4 weights, `kernels.quant`),
`paged_attention` (the engine's attention over its paged KV cache) and `latent_attention` (the
same over a LoRC latent cache). What runs where is one `Backend` object per path
(`kernels.backend`: Triton, the native CPU kernels, or the torch references), chosen from the
device and `LOWRANK_KERNELS` (read once, at import, into `BACKEND`); `backend_for` gives it.
"""

from __future__ import annotations

import torch

from .backend import BACKEND_ENV, BACKENDS, TRITON, Backend, backend_name, select
from .latent_attention import latent_attention_ref, latent_decode_refusal, latent_decode_supported, latent_decode_triton
from .lowrank_gemm import (lowrank_gemm_ref, lowrank_gemm_triton, quantized_linear_ref, quantized_linear_triton,
                           quantized_lowrank_ref, quantized_lowrank_triton)
from .paged_attention import paged_attention_ref, paged_decode_supported, paged_decode_triton
from .quant import Quantized

BACKEND = backend_name()


def backend_for(device: torch.device | str) -> Backend:
    """The path the kernels take on `device` under `BACKEND`."""
    return select(BACKEND, device)


def lowrank_gemm(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    rank: int | None = None,
) -> torch.Tensor:
    """y = ((x·Bᵀ) ⊙ scale[:rank])·A[:, :rank]ᵀ + bias for x [..., in], B [r, in], A [out, r]."""
    if backend_for(x.device).runs_gemm(x):
        return lowrank_gemm_triton(x, A, B, bias, scale, rank)
    return lowrank_gemm_ref(x, A, B, bias, scale, rank)


def quantized_linear(x: torch.Tensor, W: Quantized, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ + bias for a group-quantised W (kernels.quant): the Triton kernel dequantises as it
    loads, the reference first (also where x needs gradients: the kernels have none)."""
    if backend_for(x.device).runs_gemm(x) and not (torch.is_grad_enabled() and x.requires_grad):
        return quantized_linear_triton(x, W, bias)
    return quantized_linear_ref(x, W, bias)


def quantized_lowrank(x: torch.Tensor, A: Quantized, B: Quantized, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = (x·Bᵀ)·Aᵀ + bias for group-quantised factors, dispatched as `quantized_linear`."""
    if backend_for(x.device).runs_gemm(x) and not (torch.is_grad_enabled() and x.requires_grad):
        return quantized_lowrank_triton(x, A, B, bias)
    return quantized_lowrank_ref(x, A, B, bias)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: tuple[int, ...] | None,
    query_lens: tuple[int, ...],
    sliding_window: int | None = None,
    context_lens_tensor: torch.Tensor | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """New queries [T, Hq, D] over the paged cache: the Triton kernel for decode steps, else the reference.

    `context_lens` on the host, or `context_lens_tensor` on the device (what a captured CUDA graph reads);
    `scales`: an int8 cache's K and V scale pools [blocks, block_size, Hkv] (kernels.kv_quant), else None.
    """
    if decode_kernel_applies(q, k_cache, query_lens):
        lens = device_lens(context_lens, context_lens_tensor, q.device)
        return paged_decode_triton(q, k_cache, v_cache, block_tables, lens, sliding_window, scales)
    if context_lens is None:
        raise ValueError("the reference paged attention needs context_lens on the host")
    return paged_attention_ref(q, k_cache, v_cache, block_tables, context_lens, query_lens, sliding_window, scales)


def device_lens(context_lens: tuple[int, ...] | None, context_lens_tensor: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
    """Context lengths as int32 on `device`: the tensor given (a captured graph's buffer), else copied over."""
    if context_lens_tensor is not None:
        return context_lens_tensor
    return torch.tensor(context_lens, dtype=torch.int32).to(device, non_blocking=True)


def decode_kernel_applies(q: torch.Tensor, k_cache: torch.Tensor, query_lens: tuple[int, ...]) -> bool:
    """Whether a step with these queries runs the Triton decode kernel (one query per sequence)."""
    backend = backend_for(q.device)
    return (backend is TRITON and all(n == 1 for n in query_lens)
            and backend.decodes(q.shape[1], k_cache.shape[2], q.shape[2], q.dtype) and paged_decode_supported(q, k_cache))


def latent_attention(
    q: torch.Tensor,
    ck_cache: torch.Tensor,
    cv_cache: torch.Tensor,
    k_up: torch.Tensor,
    v_up: torch.Tensor,
    k_bias: torch.Tensor | None,
    v_bias: torch.Tensor | None,
    inv_freq: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: tuple[int, ...] | None,
    query_lens: tuple[int, ...],
    sliding_window: int | None = None,
    context_lens_tensor: torch.Tensor | None = None,
) -> torch.Tensor:
    """New queries [T, Hq, D] over the latent cache: the Triton kernel for decode steps, else the reference.

    `context_lens` on the host, or `context_lens_tensor` on the device (what a captured CUDA graph reads).
    """
    if latent_decode_kernel_applies(q, ck_cache, query_lens) and latent_decode_refusal(
            q, ck_cache, cv_cache, k_up, v_up, k_bias, v_bias, inv_freq) is None:
        lens = device_lens(context_lens, context_lens_tensor, q.device)
        return latent_decode_triton(q, ck_cache, cv_cache, k_up, v_up, k_bias, v_bias, inv_freq, block_tables,
                                    lens, sliding_window)
    if context_lens is None:
        raise ValueError("the reference latent attention needs context_lens on the host")
    return latent_attention_ref(q, ck_cache, cv_cache, k_up, v_up, k_bias, v_bias, inv_freq, block_tables,
                                context_lens, query_lens, sliding_window)


def latent_decode_kernel_applies(q: torch.Tensor, ck_cache: torch.Tensor, query_lens: tuple[int, ...]) -> bool:
    """Whether a step with these queries runs the Triton latent decode kernel (one query per sequence)."""
    backend = backend_for(q.device)
    return (backend is TRITON and all(n == 1 for n in query_lens) and q.dim() == 3
            # head groups and the value rank are checked against the weights (latent_decode_refusal)
            and backend.decodes(q.shape[1], 1, q.shape[2], q.dtype, value_rank=0)
            and latent_decode_supported(q, ck_cache))


__all__ = ["BACKEND", "BACKEND_ENV", "BACKENDS", "Backend", "backend_for", "lowrank_gemm", "lowrank_gemm_ref", "lowrank_gemm_triton", "paged_attention",
           "paged_attention_ref", "paged_decode_triton", "decode_kernel_applies", "latent_attention",
           "latent_attention_ref", "latent_decode_triton", "latent_decode_kernel_applies", "device_lens",
           "quantized_linear", "quantized_lowrank"]
