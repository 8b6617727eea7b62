"""A decoder layer's decode step on CPU as one native call (engine/cpu_decoder.c).

Through torch, a layer's decode step is ~25 calls (seven projections, norms, RoPE, cache writes,
attention, SiLU, residuals), each with its own thread-team start-up and allocation: ~17 ms of a
SmolLM2 step at batch 16 on a 2-core Zen 3 that does no arithmetic (measured with 64-wide layers),
paid alike by the compressed and the dense model. The native layer runs the same operations,
through the same kernels, in one parallel region.

`NativeDecoderLayer.build` describes a packed layer to the kernel once, at load; it returns None
for a layer the kernel does not take (an unpacked projection, a LoRC latent cache, head sizes the
attention kernel refuses), which keeps the per-operation path.
"""

from __future__ import annotations

import ctypes

import torch

from . import cpu_native
from .attention import AttentionContext
from .cpu_attention import heads_supported
from .cpu_gemm import PackedWeight
from .layers import Linear, LowRankLinear

_ptr = ctypes.c_void_p


class _Linear(ctypes.Structure):  # cpu_linear in cpu_decoder.c
    _fields_ = [("weight", _ptr), ("down", _ptr), ("up", _ptr), ("bias", _ptr), ("rank", ctypes.c_int64)]


class _Layer(ctypes.Structure):  # cpu_decoder_layer in cpu_decoder.c
    _fields_ = [*((name, _Linear) for name in ("q", "k", "v", "o", "gate", "up", "down")),
                ("input_norm", _ptr), ("post_norm", _ptr), ("eps", ctypes.c_float),
                *((name, ctypes.c_int64) for name in ("hidden", "intermediate", "num_heads", "num_kv_heads",
                                                       "head_dim", "window"))]


def _native(packed: PackedWeight) -> bool:
    return packed.kernel == "native"


def _describe(module: Linear | LowRankLinear) -> _Linear | None:
    """A packed projection as the kernel reads it; None unless every factor is on the native kernel."""
    if module.bias is not None and (module.bias.dtype != torch.float32 or not module.bias.is_contiguous()):
        return None
    bias = module.bias.data_ptr() if module.bias is not None else None
    if isinstance(module, LowRankLinear) and module.packed is not None and all(map(_native, module.packed)):
        down, up = module.packed
        return _Linear(None, down.data.data_ptr(), up.data.data_ptr(), bias, module.rank)
    if isinstance(module, Linear) and module.packed is not None and _native(module.packed):
        return _Linear(module.packed.data.data_ptr(), None, None, bias, 0)
    return None


class NativeDecoderLayer:
    """A packed `DecoderLayer` described once to the native kernel; `decode` runs its decode step."""

    def __init__(self, layer, description: _Layer):
        self.layer, self.description = layer, description  # `layer` keeps every pointed-to tensor alive

    @classmethod
    def build(cls, layer) -> NativeDecoderLayer | None:
        """The native form of a packed float32 `DecoderLayer`, or None where the kernel cannot take it."""
        attn, mlp = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        if cpu_native.library() is None or attn.latent or any(n.dtype != torch.float32 for n in norms):
            return None
        if not heads_supported(attn.num_heads, attn.num_kv_heads, attn.head_dim):
            return None
        projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                       mlp.down_proj]
        described = [_describe(p) for p in projections]
        if any(p is None for p in described):
            return None
        description = _Layer(*described, norms[0].data_ptr(), norms[1].data_ptr(), layer.input_layernorm.eps,
                             attn.q_proj.in_features, mlp.gate_proj.out_features, attn.num_heads,
                             attn.num_kv_heads, attn.head_dim, attn.sliding_window or 0)
        return cls(layer, description)

    @staticmethod
    def applies(x: torch.Tensor, ctx: AttentionContext) -> bool:
        """A decode step over the paged cache: one new token per sequence, every one reading the cache."""
        return (ctx.max_seqlen == 1 and ctx.reads_cache and ctx.slot_mapping is not None
                and ctx.context_lens_tensor is not None and x.dtype == torch.float32 and x.is_contiguous())

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """x [T, hidden] (one new token per sequence) -> the layer's output, written over x."""
        k_cache, v_cache = self.layer.self_attn.kv_cache
        tables = ctx.block_tables.to(torch.int32).contiguous()
        lens = ctx.context_lens_tensor.to(torch.int32).contiguous()
        slots = ctx.slot_mapping.to(torch.int64).contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
        status = cpu_native.library().lowrank_cpu_decoder_layer(
            ctypes.byref(self.description), x.data_ptr(), x.shape[0], cos.data_ptr(), sin.data_ptr(),
            slots.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[0], k_cache.shape[1],
            tables.data_ptr(), tables.shape[1], lens.data_ptr(), torch.get_num_threads())
        if status == -2:
            raise ValueError(f"cache slots {slots.tolist()}, context lengths {lens.tolist()} or their blocks lie "
                             f"outside the cache's {k_cache.shape[0]} blocks of {k_cache.shape[1]} or the tables")
        if status != 0:  # -1 is refused by `build`; -3 is the C side's malloc
            raise RuntimeError(f"the native decoder layer failed with status {status}")
        return x
