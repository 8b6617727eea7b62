"""The model's building blocks that are not attention: one linear type, RMSNorm, SwiGLU MLP.

Every projection in the model is a `Linear`, so the compressed loader can swap in a low-rank
linear with the same call signature without touching the model code (and the CPU serving form,
`engine.model.cpu_serving`, its packed forms). Nothing here is device-specific.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import lowrank_gemm


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
