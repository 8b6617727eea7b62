"""RMSNorm and RoPE on CPU through the native kernels (kernels/cpu/elementwise.c): one call each
instead of torch's 5-6 small ops per norm or rotation, 120 of them per SmolLM2 decode step. And the
float16 conversions the native float16 KV cache's writer and readers use, for tests to hold them to
torch's."""

from __future__ import annotations

import torch

from kernels.cpu import build as cpu_native


def native_elementwise_available(dtype: torch.dtype) -> bool:
    """Whether a CPU model of `dtype` can run its norms and RoPE natively (float32, kernels built)."""
    return dtype == torch.float32 and cpu_native.library() is not None


def _checked(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise ValueError(f"the native elementwise kernels take float32 CPU tensors, {name} is {t.dtype} on {t.device}")
    return t.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., C] -> weight ⊙ x / sqrt(mean(x²) + eps), as `engine.model.layers.RMSNorm` computes it in float32."""
    x, weight = _checked(x, "x"), _checked(weight, "weight")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"RMSNorm weight has {weight.numel()} values for {x.shape[-1]} features")
    y = torch.empty_like(x)
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if rows:
        cpu_native.library().lowrank_cpu_rmsnorm(x.data_ptr(), weight.data_ptr(), rows, x.shape[-1], eps,
                                                 y.data_ptr(), torch.get_num_threads())
    return y


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, hd] rotated by cos/sin [T, hd] (rotate-half), as `engine.model.rope.apply_rope`."""
    x, cos, sin = _checked(x, "x"), _checked(cos, "cos"), _checked(sin, "sin")
    tokens, heads, dim = x.shape
    if cos.shape != (tokens, dim) or sin.shape != (tokens, dim) or dim % 2:
        raise ValueError(f"RoPE of x {tuple(x.shape)} needs cos/sin of shape ({tokens}, {dim}) and an even head "
                         f"size, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    y = torch.empty_like(x)
    if x.numel():
        cpu_native.library().lowrank_cpu_rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), tokens, heads, dim,
                                              y.data_ptr(), torch.get_num_threads())
    return y


def float16_from_native(x: torch.Tensor) -> torch.Tensor:
    """float32 x -> float16 through the native conversion (the cache writer's), as x.to(torch.float16)."""
    x = _checked(x, "x")
    out = torch.empty(x.shape, dtype=torch.float16)
    cpu_native.library().lowrank_cpu_float_to_half(x.data_ptr(), x.numel(), out.data_ptr())
    return out


def float32_from_native(h: torch.Tensor) -> torch.Tensor:
    """float16 h -> float32 through the native conversion (the cache readers'), as h.float()."""
    if h.dtype != torch.float16 or h.device.type != "cpu":
        raise ValueError(f"the native conversion takes float16 CPU tensors, got {h.dtype} on {h.device}")
    h = h.contiguous()
    out = torch.empty(h.shape, dtype=torch.float32)
    cpu_native.library().lowrank_cpu_half_to_float(h.data_ptr(), h.numel(), out.data_ptr())
    return out
