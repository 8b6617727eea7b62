"""Linear layers on CPU through oneDNN, with each weight reordered once into oneDNN's own layout.

Why: at decode batch sizes `F.linear` takes MKL's small-M path, which on the 2-core EPYC we
measure on runs at 40-60 GFLOP/s while the weights stream from DRAM; oneDNN's inner product on a
pre-reordered weight is 1.5-3x faster from 1 to 64 rows (SmolLM2's 576 -> 49152 head at 16 rows:
17.9 ms -> 6.0 ms) and no slower at prefill sizes. These are the ops PyTorch's Inductor emits
for frozen CPU linears (`mkldnn._reorder_linear_weight`, `mkldnn._linear_pointwise`); calling
them directly needs no compile step. The packed tensor is opaque: the dense weight it came from
is dropped, except where something else reads it (a tied head's embedding table).
"""

from __future__ import annotations

import functools

import torch

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build has oneDNN and the packed-linear ops (checked once)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def can_pack(weight: torch.Tensor) -> bool:
    """A CPU weight oneDNN can reorder: float32, or bfloat16 where the CPU has bf16 support; 2-D; ops present."""
    if weight.device.type != "cpu" or weight.dtype not in PACKABLE_DTYPES or weight.dim() != 2:
        return False
    if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    return onednn_available()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] -> oneDNN's blocked copy of it (opaque; use only with `packed_linear`)."""
    if not can_pack(weight):
        raise ValueError(f"cannot pack a {weight.dtype} weight of shape {tuple(weight.shape)} on "
                         f"{weight.device} for oneDNN (CPU, float32 or bfloat16, 2-D, oneDNN present)")
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] -> x·Wᵀ + bias [..., out], W the weight `packed` came from."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
