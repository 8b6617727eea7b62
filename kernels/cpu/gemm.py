"""Linear layers on CPU with each weight repacked once, at load, for the kernel that serves it.

Two kernels, chosen per weight by `pack` (and `pack_quantized` for int8 / int4 weights, which
only the native kernel reads):

- `native` (float32): our C kernel (kernels/cpu/gemm.c, built by `kernels.cpu.build`). It serves a
  factorised layer as one fused call, (x·Bᵀ)·Aᵀ with the rank-r intermediate kept in cache, where
  oneDNN makes two calls with a fixed cost each; at decode sizes it is about twice as fast as
  oneDNN, and on par at prefill sizes (bench/results/cpu-kernels-cpu.md, bench/bench_cpu_kernels.py).
- `onednn` (float32 where the native kernel cannot be built; bfloat16 where the CPU has bf16):
  oneDNN's inner product on a weight reordered into its blocked layout
  (`mkldnn._reorder_linear_weight` / `mkldnn._linear_pointwise`, the ops Inductor emits for
  frozen CPU linears), faster than `F.linear`'s MKL path at decode sizes.

The packed weight replaces the dense one, which is dropped, except where something else reads it
(a tied head's embedding table).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field

import torch

from kernels.cpu import build as cpu_native
from kernels.quant import Quantized, levels

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


class WeightDescription(ctypes.Structure):  # cpu_weight in lowrank_cpu.h
    _fields_ = [("data", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("bits", ctypes.c_int64),
                ("group", ctypes.c_int64), ("activations", ctypes.c_int64)]


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A weight [out_features, in_features] in a kernel's own layout (opaque outside this module)."""

    data: torch.Tensor
    out_features: int
    in_features: int
    kernel: str  # "native" (panels of [in, PANEL], kernels/cpu/gemm.c) or "onednn" (its blocked layout)
    scales: torch.Tensor | None = None  # native int8 / int4: [panels, groups, PANEL] float32
    bits: int = 32  # 32 (float), 8 or 4
    group: int = 0
    activations: int = 32  # 8: rows rounded to int8 and multiplied in integers where the CPU has VNNI (gemm.c)
    native: WeightDescription | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kernel == "native":  # what the C kernel reads, made once (it points into data and scales)
            scales = self.scales.data_ptr() if self.scales is not None else None
            object.__setattr__(self, "native", WeightDescription(self.data.data_ptr(), scales, self.bits, self.group,
                                                                 self.activations))


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build has oneDNN and the packed-linear ops (checked once)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def kernel_for(weight: torch.Tensor, kernel: str | None = None) -> str | None:
    """The kernel that would serve `weight` ("native", "onednn"), or None where neither can.

    `kernel` asks for one (tests, benchmarks); None picks the fastest available.
    """
    if weight.device.type != "cpu" or weight.dtype not in PACKABLE_DTYPES or weight.dim() != 2:
        return None
    native = weight.dtype == torch.float32 and cpu_native.library() is not None
    onednn = onednn_available() and (weight.dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if kernel is None:
        return "native" if native else "onednn" if onednn else None
    return kernel if {"native": native, "onednn": onednn}.get(kernel) else None


def can_pack(weight: torch.Tensor) -> bool:
    """A 2-D CPU weight some kernel takes: float32, or bfloat16 where oneDNN has bf16 on this CPU."""
    return kernel_for(weight) is not None


def pack(weight: torch.Tensor, kernel: str | None = None) -> PackedWeight:
    """weight [out, in] -> its copy in the layout of `kernel` (default: the fastest available)."""
    chosen = kernel_for(weight, kernel)
    if chosen is None:
        wanted = f"the {kernel} kernel" if kernel else "a CPU kernel"
        raise ValueError(f"cannot pack a {weight.dtype} weight of shape {tuple(weight.shape)} on {weight.device} "
                         f"for {wanted} (CPU, float32 or bfloat16, 2-D; native needs a C compiler, onednn oneDNN)")
    out_f, in_f = weight.shape
    if chosen == "native":
        data = _panels(weight)
    else:
        data = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
    return PackedWeight(data, out_f, in_f, chosen)


def _panels(rows: torch.Tensor) -> torch.Tensor:
    """[out, cols] (any dtype) -> [panels, cols, PANEL], output rows zero-padded to whole panels."""
    panel = cpu_native.constant("PANEL")  # output columns per panel, as the library was built
    out_f, cols = rows.shape
    panels = -(-out_f // panel)
    padded = torch.zeros(panels * panel, cols, dtype=rows.dtype)
    padded[:out_f] = rows
    return padded.view(panels, panel, cols).transpose(1, 2).contiguous()


def can_pack_quantized(qw: Quantized) -> bool:
    """Whether the native kernel can serve `qw` (built here, float32 scales on the CPU)."""
    return (cpu_native.library() is not None and qw.q.device.type == "cpu" and qw.scales.dtype == torch.float32
            and qw.group % 2 == 0)


def int8_products() -> bool:
    """Whether the native library multiplies int8 activations by int8 / int4 weights here (VNNI)."""
    return cpu_native.library() is not None and bool(cpu_native.constant("VNNI"))


def pack_quantized(qw: Quantized, int8_activations: bool = False) -> PackedWeight:
    """A quantised weight (kernels.quant) -> the native kernel's int8 / int4 panels and their scales.

    `int8_activations`: from a few rows up, round the input rows to int8 per group of this weight
    (kernels.quant.quantize_activations) and multiply in integers, where the CPU has VNNI
    (`int8_products`) and the group is a multiple of 8; elsewhere the float path serves it.
    """
    if not can_pack_quantized(qw):
        raise ValueError(f"cannot pack an int{qw.bits} weight with {qw.scales.dtype} scales on {qw.q.device} for "
                         "the native CPU kernel (it needs the library built here and float32 scales)")
    q = levels(qw)  # int8 [out, cols]
    out_f, cols = q.shape
    per_word = 32 // qw.bits  # inputs of one output per 32-bit word (gemm.c), the first in the lowest bits
    q = torch.nn.functional.pad(q, (0, -cols % per_word)).view(out_f, -1, per_word)
    if qw.bits == 8:
        words = q.contiguous().view(torch.int32).squeeze(-1)  # little-endian: byte j is input 4r + j
    else:
        nibbles = (q.to(torch.int64) & 0xF) << (4 * torch.arange(per_word))
        words = nibbles.sum(-1)
        words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return PackedWeight(_panels(words), out_f, cols, "native", _panels(qw.scales), qw.bits, qw.group,
                        8 if int8_activations else 32)


def _rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x [..., in] -> contiguous float32 rows [N, in] for the native kernel (no copy when already so)."""
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the packed weight takes {in_features}")
    if x.dtype != torch.float32:
        raise ValueError(f"the native CPU kernel takes float32 inputs, got {x.dtype}")
    return x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, in_features).contiguous()


def _like_input(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def _bias_pointer(bias: torch.Tensor | None, out_features: int) -> int | None:
    """The bias's data pointer for the C kernel (None stays NULL), after checking what the kernel reads."""
    if bias is None:
        return None
    if bias.dtype != torch.float32 or bias.device.type != "cpu" or not bias.is_contiguous():
        raise ValueError(f"the native CPU kernel takes a contiguous float32 CPU bias, got {bias.dtype} on {bias.device}")
    if bias.numel() != out_features:
        raise ValueError(f"bias has {bias.numel()} values for {out_features} outputs")
    return bias.data_ptr()


def packed_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] -> x·Wᵀ + bias [..., out], W the weight `packed` came from."""
    if packed.kernel == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, packed.data, bias, "none", [], "")
    rows = _rows(x, packed.in_features)
    y = torch.empty(rows.shape[0], packed.out_features, dtype=rows.dtype)
    if rows.shape[0]:
        cpu_native.library().lowrank_cpu_linear(
            rows.data_ptr(), rows.shape[0], packed.in_features, ctypes.byref(packed.native), packed.out_features,
            _bias_pointer(bias, packed.out_features), y.data_ptr(), torch.get_num_threads())
    return _like_input(y, x)


def packed_lowrank(x: torch.Tensor, packed_B: PackedWeight, packed_A: PackedWeight,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] -> (x·Bᵀ)·Aᵀ + bias [..., out]: one fused call when both factors are native."""
    if packed_B.kernel != "native" or packed_A.kernel != "native":
        return packed_linear(packed_linear(x, packed_B), packed_A, bias)
    if packed_A.in_features != packed_B.out_features:
        raise ValueError(f"factor shapes disagree: B gives rank {packed_B.out_features}, "
                         f"A takes {packed_A.in_features}")
    rows = _rows(x, packed_B.in_features)
    m, rank = rows.shape[0], packed_B.out_features
    y = torch.empty(m, packed_A.out_features, dtype=rows.dtype)
    if m:
        scratch = torch.empty(m, rank, dtype=rows.dtype)
        cpu_native.library().lowrank_cpu_lowrank(
            rows.data_ptr(), m, packed_B.in_features, ctypes.byref(packed_B.native), rank,
            ctypes.byref(packed_A.native), packed_A.out_features, _bias_pointer(bias, packed_A.out_features),
            scratch.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return _like_input(y, x)
