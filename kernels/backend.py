"""Which kernels serve a model: one object per path, saying what its kernels take.

A path is what a model's GEMMs and decode attention run on, chosen from the device and
`LOWRANK_KERNELS` (never from `TRITON_INTERPRET` alone: a test that wants the Triton path under
the interpreter asks for it with `LOWRANK_KERNELS=triton`):

- `auto` (default): `TRITON` on CUDA, `NATIVE` on CPU (`TORCH` on any other device).
- `triton`: `TRITON` on any device; CPU tensors then need `TRITON_INTERPRET=1` (how CI runs them).
- `torch`: `TORCH`, the plain modules and torch references everywhere (debugging: rules every
  kernel out, flash-attn and the native CPU kernels included).

The engine asks once, at load (`engine.core.runner`): whether the model is swapped into its CPU
serving form, and whether its decode steps run a kernel free of host syncs (CUDA graphs). The
dispatchers in `kernels` ask the same object per call, so a step the load-time answer sends to a
kernel reaches it; inputs it does not take (a prefill chunk, float64) go to the reference.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .interpreter import INTERPRET
from .latent_attention import MAX_RANK_V, latent_decode_takes
from .lowrank_gemm import KERNEL_DTYPES
from .paged_attention import paged_decode_takes

BACKEND_ENV = "LOWRANK_KERNELS"
BACKENDS = ("auto", "torch", "triton")
TRITON_DTYPES = frozenset(KERNEL_DTYPES)
FLASH_DTYPES = frozenset((torch.float16, torch.bfloat16))


def backend_name() -> str:
    """`LOWRANK_KERNELS`, checked: a misspelt value is an error, not a silent fallback."""
    name = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


@dataclass(frozen=True)
class Backend:
    """What one path's kernels take. Anything they do not take runs the torch reference."""

    name: str
    gemm_dtypes: frozenset[torch.dtype]  # `kernels.lowrank_gemm` runs the Triton kernel for these
    decode_dtypes: frozenset[torch.dtype]  # decode steps over the paged cache run a kernel for these
    takes_heads: Callable[[int, int, int], bool]  # (heads, kv heads, head size) its paged decode kernel takes
    latent_decode: bool  # a decode kernel over a LoRC latent cache
    flash: bool  # flash-attn, where installed, for CUDA fp16/bf16 attention
    cpu_serving: bool  # the model runs in its CPU serving form (`engine.model.cpu_serving`)
    graph_safe: bool  # its decode kernels read lengths from the device: CUDA graphs can capture them

    def runs_gemm(self, x: torch.Tensor) -> bool:
        return x.dtype in self.gemm_dtypes

    def decodes(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                value_rank: int | None = None) -> bool:
        """Whether decode steps with these heads run this path's kernel: over a full cache
        (`value_rank` None) or over a latent cache whose values have `value_rank` components."""
        if dtype not in self.decode_dtypes or num_heads % num_kv_heads:
            return False
        if value_rank is not None:
            return self.latent_decode and value_rank <= MAX_RANK_V and latent_decode_takes(head_dim)
        return self.takes_heads(num_heads, num_kv_heads, head_dim)

    def graphs_capture(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                       value_ranks: list[int | None]) -> bool:
        """Whether every layer's decode step (value rank per layer, None for a full cache) is free
        of host syncs, as a captured CUDA graph needs."""
        return self.graph_safe and all(self.decodes(num_heads, num_kv_heads, head_dim, dtype, r) for r in value_ranks)


def _native_heads(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    from .cpu.attention import heads_supported  # ctypes: only the CPU path loads the library

    return heads_supported(num_heads, num_kv_heads, head_dim)


TRITON = Backend("triton", TRITON_DTYPES, TRITON_DTYPES, lambda h, kv, d: paged_decode_takes(d), latent_decode=True,
                 flash=True, cpu_serving=False, graph_safe=True)
# The native CPU kernels: packed GEMMs and float32 paged decode, reached through the CPU serving
# form's modules; `kernels.lowrank_gemm` (the trainers' GEMM, which needs a backward) is the reference.
NATIVE = Backend("native", frozenset(), frozenset((torch.float32,)), _native_heads, latent_decode=False,
                 flash=False, cpu_serving=True, graph_safe=False)
TORCH = Backend("torch", frozenset(), frozenset(), lambda h, kv, d: False, latent_decode=False, flash=False,
                cpu_serving=False, graph_safe=False)


def select(name: str, device: torch.device | str) -> Backend:
    """The path `name` (a `BACKENDS` value) gives on `device`."""
    device = torch.device(device)
    if name == "torch":
        return TORCH
    if name == "triton" or device.type == "cuda":
        if device.type != "cuda" and not INTERPRET:
            raise ValueError(f"{BACKEND_ENV}=triton on {device.type} needs TRITON_INTERPRET=1 (Triton's CPU "
                             f"interpreter, set before triton is imported); {BACKEND_ENV}=auto serves CPUs natively")
        return TRITON
    return NATIVE if device.type == "cpu" else TORCH
