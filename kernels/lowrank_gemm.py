"""Low-rank GEMM y = ((x·Bᵀ) ⊙ scale[:rank]) · A[:, :rank]ᵀ + bias.

`lowrank_gemm_ref` is the plain-torch reference (and the CPU path): written for clarity, the
Triton kernel is checked against it.
"""

from __future__ import annotations

import torch


def check_lowrank_args(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None,
    rank: int | None,
) -> int:
    """Validate shapes; return the rank to use. Errors name the tensors and their shapes."""
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0]:
        raise ValueError(f"A must be [out, r] and B [r, in], got A {tuple(A.shape)} and B {tuple(B.shape)}")
    if x.shape[-1] != B.shape[1]:
        raise ValueError(f"x [..., {x.shape[-1]}] does not match B {tuple(B.shape)} (in = {B.shape[1]})")
    r = B.shape[0] if rank is None else rank
    if not 0 <= r <= B.shape[0]:
        raise ValueError(f"rank must be in [0, {B.shape[0]}], got {rank}")
    if scale is not None and (scale.dim() != 1 or scale.shape[0] < r):
        raise ValueError(f"scale must be [r >= {r}], got {tuple(scale.shape)}")
    if bias is not None and bias.shape != (A.shape[0],):
        raise ValueError(f"bias must be [{A.shape[0]}], got {tuple(bias.shape)}")
    return r


def lowrank_gemm_ref(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    rank: int | None = None,
) -> torch.Tensor:
    """x [..., in], B [r, in], A [out, r] -> y [..., out]; only the first `rank` components used."""
    r = check_lowrank_args(x, A, B, bias, scale, rank)
    t = x @ B[:r].T  # (..., r)
    if scale is not None:
        t = t * scale[:r]
    y = t @ A[:, :r].T  # (..., out)
    return y if bias is None else y + bias
