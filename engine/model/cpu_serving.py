"""The CPU serving form of a model: its modules swapped, once, at load, for ones that run the
native CPU kernels (kernels/cpu), as the loader swaps in `LowRankLinear` and gpt-fast's
`quantize.py` swaps in its int8 linear. The plain modules know nothing of it.

- `Linear` -> `PackedLinear`, `LowRankLinear` -> `PackedLowRankLinear`: each weight repacked for
  the CPU GEMM that serves it (`kernels.cpu.gemm`: our C kernel for float32 and for int8 / int4
  levels, oneDNN otherwise); a factorised layer is one fused call. A tied head gets a `PackedLinear` over a copy of the
  embedding table, which stays for lookups.
- `RMSNorm` -> `NativeRMSNorm`, `RoPE` -> `NativeRoPE`: one native call each (float32).
- `Attention` -> `NativeAttention`: decode steps over the paged cache through the native kernel,
  where it takes the layer's heads (`kernels.backend.NATIVE`).
- `DecoderLayer` -> `NativeDecoderLayer`: a layer's whole decode step as one native call, where
  the kernel takes the layer (`kernels.cpu.decoder_layer`).

Where the native library is not built (no compiler, `LOWRANK_NATIVE_CPU=0`) only the packed
linears (through oneDNN) are swapped in. The swap is one-way: the dense weights are dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kernels import device_lens
from kernels.backend import NATIVE
from kernels.cpu.attention import native_paged_decode
from kernels.cpu.decoder_layer import LayerDescription, decode_layer, describe_layer, describe_linear
from kernels.cpu.elementwise import native_elementwise_available, rms_norm, rope
from kernels.cpu.gemm import (PackedWeight, can_pack, can_pack_quantized, pack, pack_quantized, packed_linear,
                              packed_lowrank)

from .attention import AttentionContext
from .layers import Linear, LowRankLinear, QuantLinear, QuantLowRankLinear, RMSNorm
from .llama import Attention, CausalLM, DecoderLayer
from .rope import RoPE


class PackedLinear(nn.Module):
    """y = x Wᵀ + b through a packed CPU GEMM; W lives only in the kernel's layout."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.packed, self.bias = packed, bias

    @classmethod
    def from_linear(cls, linear: Linear, int8_activations: bool = False) -> PackedLinear:
        return cls(_packed(linear, "weight", linear.in_features, int8_activations), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.packed.kernel}"


class PackedLowRankLinear(nn.Module):
    """y = (x Bᵀ) Aᵀ + b through packed CPU GEMMs, one fused call where both factors are native."""

    def __init__(self, packed_B: PackedWeight, packed_A: PackedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.rank = packed_B.in_features, packed_A.out_features, \
            packed_B.out_features
        self.packed, self.bias = (packed_B, packed_A), bias

    @classmethod
    def from_lowrank(cls, linear: LowRankLinear, int8_activations: bool = False) -> PackedLowRankLinear:
        return cls(_packed(linear, "B", linear.in_features, int8_activations),
                   _packed(linear, "A", linear.rank, int8_activations), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_lowrank(x, *self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, kernel={self.packed[0].kernel}"


def _packed(linear: Linear | LowRankLinear, leaf: str, cols: int, int8_activations: bool) -> PackedWeight:
    """One of a linear's matrices packed: its int8 / int4 levels as they are where the native kernel
    reads them (multiplied by int8-rounded rows with `int8_activations`, kernels.cpu.gemm), else the
    float matrix (a quantised one dequantised, the reference's weights)."""
    if isinstance(linear, (QuantLinear, QuantLowRankLinear)) and can_pack_quantized(q := linear.quantized(leaf, cols)):
        return pack_quantized(q, int8_activations)
    return pack(getattr(linear, leaf))


class NativeRMSNorm(nn.Module):
    """`RMSNorm` in one native call (`kernels.cpu.elementwise`)."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class NativeRoPE(nn.Module):
    """`RoPE` in one native call (`kernels.cpu.elementwise`)."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rope(x, cos, sin)


def _same_state(cls: type[nn.Module], module: nn.Module) -> nn.Module:
    """`module` as an instance of its subclass `cls`, sharing its submodules, parameters and cache:
    a swap, not a copy."""
    swapped = cls.__new__(cls)
    swapped.__dict__.update(module.__dict__)
    return swapped


class NativeAttention(Attention):
    """`Attention` whose decode steps over the paged cache run the native kernel (`kernels.cpu.attention`)."""

    @staticmethod
    def takes(attn: Attention, dtype: torch.dtype) -> bool:
        """Whether the kernel takes this layer's decode steps (asked once, at the swap)."""
        return not attn.latent and NATIVE.decodes(attn.num_heads, attn.num_kv_heads, attn.head_dim, dtype)

    def _cached_attention(self, q: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if ctx.max_seqlen == 1:
            lens = device_lens(ctx.context_lens, ctx.context_lens_tensor, q.device)
            return native_paged_decode(q, *self.kv_cache, ctx.block_tables, lens, self.sliding_window, self.kv_scales)
        return super()._cached_attention(q, ctx)


class NativeDecoderLayer(DecoderLayer):
    """A `DecoderLayer` whose decode steps run as one native call; other steps (prefill, mixed
    batches) go operation by operation through the same (swapped) modules."""

    description: LayerDescription  # what the kernel reads; points into this layer's own tensors

    @classmethod
    def build(cls, layer: DecoderLayer) -> NativeDecoderLayer | None:
        """The native form of a swapped float32 layer, or None where the kernel cannot take it."""
        attn, mlp = layer.self_attn, layer.mlp
        if attn.latent:
            return None
        projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        described = [describe_linear(p.packed, p.bias) if isinstance(p, (PackedLinear, PackedLowRankLinear)) else None
                     for p in projections]
        description = describe_layer(described, layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                                     layer.input_layernorm.eps, attn.q_proj.in_features, mlp.gate_proj.out_features,
                                     attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.sliding_window)
        if description is None:
            return None
        native = _same_state(cls, layer)
        native.description = description
        return native

    @staticmethod
    def applies(x: torch.Tensor, ctx: AttentionContext) -> bool:
        """A decode step over the paged cache: one new token per sequence, every one reading the cache."""
        return (ctx.max_seqlen == 1 and ctx.reads_cache and ctx.slot_mapping is not None
                and ctx.context_lens_tensor is not None and x.dtype == torch.float32 and x.is_contiguous())

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if not self.applies(x, ctx):
            return super().forward(x, cos, sin, ctx)
        k_cache, v_cache = self.self_attn.kv_cache
        return decode_layer(self.description, x, cos, sin, ctx.slot_mapping, k_cache, v_cache, ctx.block_tables,
                            ctx.context_lens_tensor, self.self_attn.kv_scales)  # x is updated in place


def decode_weight_bytes(model: CausalLM) -> int:
    """Bytes of parameters one decode step of the serving form reads: every packed matrix (its
    levels and scales, the head's included), biases and norms. The token table's lookups read one
    row per token and are left out. Read against tok/s, it is the memory bandwidth decode draws."""
    total = 0
    for module in model.modules():
        if isinstance(module, (PackedLinear, PackedLowRankLinear)):
            packed = module.packed if isinstance(module, PackedLowRankLinear) else (module.packed,)
            total += sum(p.data.nbytes + (p.scales.nbytes if p.scales is not None else 0) for p in packed)
            total += module.bias.nbytes if module.bias is not None else 0
        elif isinstance(module, (RMSNorm, NativeRMSNorm)):
            total += module.weight.nbytes
    return total


def _swap(root: nn.Module, replacement: Callable[[nn.Module], nn.Module | None]) -> None:
    """Replace every submodule m of `root` for which `replacement(m)` is not None (children first)."""
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            new = replacement(child)
            if new is not None:
                setattr(parent, name, new)


def to_cpu_serving(model: CausalLM, int8_activations: bool = False) -> bool:
    """Swap `model` (on CPU) into its serving form; returns False, changing nothing, where no CPU
    kernel takes its dtype (float32, or bfloat16 where oneDNN has it). `int8_activations`: int8 /
    int4 weights multiply int8-rounded rows where the CPU has VNNI (kernels.cpu.gemm.pack_quantized)."""
    dtype = model.dtype
    if model.device.type != "cpu" or not can_pack(torch.empty(0, 0, dtype=dtype)):
        return False
    latent = {id(m) for layer in model.model.layers if layer.self_attn.latent
              for m in (layer.self_attn.k_proj, layer.self_attn.v_proj)}  # their A feeds latent attention
    _swap(model, lambda m: None if id(m) in latent else PackedLinear.from_linear(m, int8_activations)
          if isinstance(m, Linear) else PackedLowRankLinear.from_lowrank(m, int8_activations)
          if isinstance(m, LowRankLinear) else None)
    if model.lm_head is None:
        model.lm_head = PackedLinear(pack(model.model.embed_tokens.weight), None)
    if not native_elementwise_available(dtype):
        return True
    _swap(model, lambda m: NativeRMSNorm(m) if isinstance(m, RMSNorm) else NativeRoPE() if isinstance(m, RoPE)
          else _same_state(NativeAttention, m) if isinstance(m, Attention) and NativeAttention.takes(m, dtype)
          else None)
    _swap(model, lambda m: NativeDecoderLayer.build(m) if isinstance(m, DecoderLayer) else None)
    return True
