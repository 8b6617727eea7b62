"""The model's building blocks that are not attention: one linear type, RMSNorm, SwiGLU MLP.

Every projection in the model is a `Linear`, so the compressed loader can swap in a low-rank
linear with the same call signature without touching the model code (and the CPU serving form,
`engine.model.cpu_serving`, its packed forms). The quantised forms (`QuantLinear`,
`QuantLowRankLinear`) are subclasses whose `weight` / `A` / `B` are the dequantised matrices, so
every consumer of a linear's matrices works on them unchanged. Nothing here is device-specific.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import lowrank_gemm, quantized_linear, quantized_lowrank
from kernels.quant import Quantized, dequantize, n_groups, stored_cols


class Linear(nn.Module):
    """y = x Wᵀ + b with W [out, in], stored under HF's names (`weight`, `bias`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class LowRankLinear(nn.Module):
    """y = (x Bᵀ) Aᵀ + b with A [out, r], B [r, in]: a factorised `Linear`, same call signature.

    Stored as `A`, `B` (and `bias`) under the original module's name, components in descending
    importance, so `A[:, :k]`, `B[:k]` is itself a valid smaller layer.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(out_features, rank), requires_grad=False)
        self.B = nn.Parameter(torch.empty(rank, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowrank_gemm(x, self.A, self.B, self.bias)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """x·Bᵀ [..., r]: the latent a LoRC attention layer caches for its K or V projection."""
        return F.linear(x, self.B)

    def up(self, latent: torch.Tensor) -> torch.Tensor:
        """latent·Aᵀ + bias [..., out]: what `down` left, projected back up."""
        return F.linear(latent, self.A, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


class _QuantStore:
    """Group-quantised matrices (`kernels.quant`) held as buffers `<leaf>_q` (int8 levels, or int4
    packed two per byte in uint8) and `<leaf>_scales` (one per group of input channels), the names
    they have in the checkpoint. `forward` goes through the kernels' dispatch (the Triton kernels
    dequantise as they load); the float matrices (`weight`, `A`, `B`) are rebuilt on each use, in
    the scales' dtype (the serving dtype), for every other reader. The CPU serving form replaces
    the module with the native kernel's packed levels."""

    bits: int
    group: int

    def _register_quantized(self, leaf: str, rows: int, cols: int) -> None:
        levels = torch.empty(rows, stored_cols(cols, self.bits), dtype=torch.int8 if self.bits == 8 else torch.uint8)
        self.register_buffer(f"{leaf}_q", levels)
        self.register_buffer(f"{leaf}_scales", torch.empty(rows, n_groups(cols, self.group)))

    def quantized(self, leaf: str, cols: int) -> Quantized:
        return Quantized(getattr(self, f"{leaf}_q"), getattr(self, f"{leaf}_scales"), self.bits, self.group, cols)

    def _dequantized(self, leaf: str, cols: int) -> torch.Tensor:
        scales = getattr(self, f"{leaf}_scales")
        return dequantize(self.quantized(leaf, cols), scales.dtype)


class QuantLinear(_QuantStore, Linear):
    """A `Linear` whose weight is stored group-quantised; `weight` is the dequantised [out, in]."""

    def __init__(self, in_features: int, out_features: int, bits: int, group: int, bias: bool = False):
        nn.Module.__init__(self)  # not Linear's: there is no float weight to allocate
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        self._register_quantized("weight", out_features, in_features)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        return self._dequantized("weight", self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.quantized("weight", self.in_features), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int{self.bits}, group={self.group}"


class QuantEmbedding(_QuantStore, nn.Module):
    """A token table [vocab, hidden] stored group-quantised (a tied table is the head too): a lookup
    dequantises only the rows it gathers; `weight` is the whole dequantised table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.bits, self.group = num_embeddings, embedding_dim, bits, group
        self._register_quantized("weight", num_embeddings, embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        return self._dequantized("weight", self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = Quantized(self.weight_q[flat], self.weight_scales[flat], self.bits, self.group, self.embedding_dim)
        return dequantize(rows, self.weight_scales.dtype).view(*ids.shape, self.embedding_dim)

    def as_head(self) -> QuantLinear:
        """The head tied to this table: a `QuantLinear` over the same buffers (nothing copied)."""
        with torch.device("meta"):
            head = QuantLinear(self.embedding_dim, self.num_embeddings, self.bits, self.group)
        head.weight_q, head.weight_scales = self.weight_q, self.weight_scales
        return head


class QuantLowRankLinear(_QuantStore, LowRankLinear):
    """A `LowRankLinear` whose factors are stored group-quantised (A's groups run along its rank, so
    a rank prefix keeps whole groups but the last); `A` [out, r] and `B` [r, in] are dequantised."""

    def __init__(self, in_features: int, out_features: int, rank: int, bits: int, group: int, bias: bool = False):
        nn.Module.__init__(self)  # not LowRankLinear's: there are no float factors to allocate
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.bits, self.group = bits, group
        self._register_quantized("A", out_features, rank)
        self._register_quantized("B", rank, in_features)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    @property
    def A(self) -> torch.Tensor:  # noqa: N802 (the factor's name in the checkpoint and the papers)
        return self._dequantized("A", self.rank)

    @property
    def B(self) -> torch.Tensor:  # noqa: N802
        return self._dequantized("B", self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_lowrank(x, self.quantized("A", self.rank), self.quantized("B", self.in_features), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int{self.bits}, group={self.group}"


class RMSNorm(nn.Module):
    """Normalise in float32, scale in the input dtype (as HF Llama does, so fp16 logits match)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, bias: bool):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias)
        self.up_proj = Linear(hidden, intermediate, bias)
        self.down_proj = Linear(intermediate, hidden, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
