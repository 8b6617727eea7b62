"""A decoder layer's decode step on CPU as one native call (kernels/cpu/decoder_layer.c).

Through torch, a layer's decode step is ~25 calls (seven projections, norms, RoPE, cache writes,
attention, SiLU, residuals), each with its own thread-team start-up and allocation, paid alike by
the compressed and the dense model (bench/results/engine-cpu.md). The native layer runs the same
operations, through the same kernels, in one parallel region.

`describe_layer` describes a packed layer to the kernel once, at load (the engine's
`engine.model.cpu_serving.NativeDecoderLayer` holds the description and every tensor it points
to); it returns None for a layer the kernel does not take, which keeps the per-operation path.
The ctypes structures mirror `cpu_weight` (kernels.cpu.gemm), `cpu_linear` and `cpu_decoder_layer`
in lowrank_cpu.h; their layout is checked against the library's own offsets before the first
description is made.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import build as cpu_native
from .attention import cache_bits, heads_supported
from .gemm import PackedWeight, WeightDescription

_ptr = ctypes.c_void_p
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")  # the order of cpu_decoder_layer's fields


class LinearDescription(ctypes.Structure):  # cpu_linear in lowrank_cpu.h
    _fields_ = [("weight", WeightDescription), ("down", WeightDescription), ("up", WeightDescription),
                ("bias", _ptr), ("rank", ctypes.c_int64)]


class LayerDescription(ctypes.Structure):  # cpu_decoder_layer in lowrank_cpu.h
    _fields_ = [*((name, LinearDescription) for name in PROJECTIONS),
                ("input_norm", _ptr), ("post_norm", _ptr), ("eps", ctypes.c_float),
                *((name, ctypes.c_int64) for name in ("hidden", "intermediate", "num_heads", "num_kv_heads",
                                                       "head_dim", "window"))]


def layout_mismatches() -> list[str]:
    """Where the ctypes mirrors disagree with the structs the library was compiled with (empty: none)."""
    found = []
    for struct, c_name in ((WeightDescription, "cpu_weight"), (LinearDescription, "cpu_linear"),
                           (LayerDescription, "cpu_decoder_layer")):
        if ctypes.sizeof(struct) != (size := cpu_native.constant(f"sizeof({c_name})")):
            found.append(f"sizeof({c_name}): {size} in C, {ctypes.sizeof(struct)} in Python")
        for name, _ in struct._fields_:
            try:
                c_offset = cpu_native.constant(f"{c_name}.{name}")
            except cpu_native.BuildError:
                found.append(f"{c_name}.{name}: not in lowrank_cpu.h")
                continue
            if c_offset != (py_offset := getattr(struct, name).offset):
                found.append(f"{c_name}.{name}: offset {c_offset} in C, {py_offset} in Python")
    return found


@functools.cache
def _checked_layout() -> None:
    mismatches = layout_mismatches()
    if mismatches:
        raise RuntimeError(f"kernels/cpu/decoder_layer.py and lowrank_cpu.h disagree: {'; '.join(mismatches)}")


def describe_linear(packed: PackedWeight | tuple[PackedWeight, PackedWeight],
                    bias: torch.Tensor | None) -> LinearDescription | None:
    """A packed projection (one weight, or the factors (B, A)) as the kernel reads it; None unless
    every factor is on the native kernel and the bias is a contiguous float32 vector."""
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return None
    factors = packed if isinstance(packed, tuple) else (packed,)
    if any(f.kernel != "native" for f in factors):
        return None
    bias_ptr = bias.data_ptr() if bias is not None else None
    if isinstance(packed, tuple):
        down, up = packed
        return LinearDescription(WeightDescription(), down.native, up.native, bias_ptr, down.out_features)
    return LinearDescription(packed.native, WeightDescription(), WeightDescription(), bias_ptr, 0)


def describe_layer(projections: list[LinearDescription | None], input_norm: torch.Tensor, post_norm: torch.Tensor,
                   eps: float, hidden: int, intermediate: int, num_heads: int, num_kv_heads: int, head_dim: int,
                   window: int | None) -> LayerDescription | None:
    """A layer (its seven projections in `PROJECTIONS` order, norms and head geometry) as the kernel
    reads it; None where the kernel cannot take it (no library, a projection it cannot read, norms
    that are not float32, head sizes the attention kernel refuses, an odd head size for RoPE)."""
    if cpu_native.library() is None or any(p is None for p in projections):
        return None
    if any(n.dtype != torch.float32 or not n.is_contiguous() for n in (input_norm, post_norm)):
        return None
    if head_dim % 2 or not heads_supported(num_heads, num_kv_heads, head_dim):
        return None
    _checked_layout()
    return LayerDescription(*projections, input_norm.data_ptr(), post_norm.data_ptr(), eps, hidden, intermediate,
                            num_heads, num_kv_heads, head_dim, window or 0)


def decode_layer(description: LayerDescription, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [T, hidden] (one new token per sequence) -> the layer's output, written over x; the new
    tokens' K/V go to `slots` of the caches [blocks, block_size, Hkv, D] (float32 or float16, or int8
    with `scales`, their scale pools [blocks, block_size, Hkv]: kernels/kv_quant.py)."""
    bits = cache_bits(k_cache, v_cache, scales)
    if bits is None:
        raise ValueError(f"the native decoder layer takes contiguous float32 or float16 caches, or int8 ones with "
                         f"float32 scale pools {tuple(k_cache.shape[:3])}; got {k_cache.dtype} / {v_cache.dtype}"
                         f"{'' if scales is None else ' with scales ' + str([tuple(s.shape) for s in scales])}")
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    slots = slots.to(torch.int64).contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    k_scales, v_scales = (s.data_ptr() for s in scales) if scales is not None else (None, None)
    status = cpu_native.library().lowrank_cpu_decoder_layer(
        ctypes.byref(description), x.data_ptr(), x.shape[0], cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), bits, k_scales, v_scales, k_cache.shape[0], k_cache.shape[1],
        tables.data_ptr(),
        tables.shape[1], lens.data_ptr(), torch.get_num_threads())
    if status == -2:
        raise ValueError(f"cache slots {slots.tolist()}, context lengths {lens.tolist()} or their blocks lie "
                         f"outside the cache's {k_cache.shape[0]} blocks of {k_cache.shape[1]} or the tables")
    if status != 0:  # -1 is refused by `describe_layer`; -3 is the C side's malloc
        raise RuntimeError(f"the native decoder layer failed with status {status}")
    return x
