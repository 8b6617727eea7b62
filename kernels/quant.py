"""Weight-only group quantisation: the stored format and its plain-torch reference.

Every quantised weight W [out, in] (a dense linear, a factor A [out, r] or B [r, in]) keeps one
scale per group of `group` consecutive input channels, so a group never straddles two output rows
and a rank prefix stays valid: B's first r' rows are B's rows, and A's first r' columns are its
first ⌈r'/group⌉ groups, the last one possibly cut (its scale still applies to the columns kept).
For the same reason the last group of a row may be short: factor ranks are whatever bake chose,
not multiples of the group.

Both formats are symmetric, as llama.cpp's Q8_0 and Q4_0 are (no zero point: weights are centred,
and a zero point costs a multiply-add per group in the kernel for little gain at these groups):
- int8: q = round(w / d) in [-127, 127], d = max|w| / 127 per group.
- int4: q in [-8, 7], d = −(the group's value of largest magnitude) / 8, so that value maps to −8
  exactly and the 16 levels are all used (Q4_0's trick); two values per byte along the input
  dimension, the even column in the low nibble, stored as q + 8 in uint8.
Scales are float32 here (the serving dtype is the kernel's concern); an all-zero group gets d = 0
and dequantises to zeros.

The kernels (native CPU and Triton) are tested against `dequantize` in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (8, 4)


@dataclass(frozen=True, slots=True)
class Quantized:
    """One quantised weight: `q` (int8 [out, in], or uint8 [out, ⌈in/2⌉] packed for int4) and
    `scales` float32 [out, ⌈in/group⌉]; `cols` is the unpacked input width."""

    q: torch.Tensor
    scales: torch.Tensor
    bits: int
    group: int
    cols: int


def stored_cols(cols: int, bits: int) -> int:
    """Columns of `q` for an input width `cols`: one byte per value for int8, two values per byte for int4."""
    return -(-cols // 2) if bits == 4 else cols


def n_groups(cols: int, group: int) -> int:
    """Scales per row: ⌈cols / group⌉ (the last group may be short)."""
    return -(-cols // group)


def check_format(bits: int, group: int) -> None:
    """A ValueError naming the problem unless (bits, group) is a format this module knows."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")
    if not isinstance(group, int) or group < 2 or group % 2:
        raise ValueError(f"group must be an even integer >= 2, got {group!r}")


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """[out, in] → [out, ⌈in/group⌉, group], the short last group padded with zeros."""
    out, cols = w.shape
    pad = -cols % group
    return torch.nn.functional.pad(w, (0, pad)).view(out, -1, group)


def quantize(w: torch.Tensor, bits: int, group: int) -> Quantized:
    """Round-to-nearest group quantisation of a 2-D weight (computed in float64)."""
    check_format(bits, group)
    if w.dim() != 2:
        raise ValueError(f"quantize takes a 2-D weight, got shape {tuple(w.shape)}")
    out, cols = w.shape
    g = _grouped(w.detach().to(torch.float64), group)
    d = group_scale(g, bits)
    q = round_to_levels(g, d.unsqueeze(-1), bits).view(out, -1)[:, :cols]
    return from_levels(q, d, bits, group)


LEVELS = {8: (-127, 127), 4: (-8, 7)}


def group_scale(g: torch.Tensor, bits: int) -> torch.Tensor:
    """The scale d of each group of weights g [..., group] (zeros pad a short group), in float64
    but rounded to the float32 it is stored as, so the levels are rounded against the served scale."""
    if bits == 8:
        d = g.abs().amax(dim=-1) / 127
    else:
        idx = g.abs().argmax(dim=-1, keepdim=True)
        d = -g.gather(-1, idx).squeeze(-1) / 8
    return d.to(torch.float32).to(torch.float64)


def round_to_levels(w: torch.Tensor, d: torch.Tensor, bits: int) -> torch.Tensor:
    """round(w / d) clamped to the format's levels, int8 (d broadcasts against w; d = 0 gives 0)."""
    lo, hi = LEVELS[bits]
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return torch.round(w * inv).clamp_(lo, hi).to(torch.int8)


def from_levels(q: torch.Tensor, d: torch.Tensor, bits: int, group: int) -> Quantized:
    """Integer levels int8 [out, cols] and their scales [out, ⌈cols/group⌉] as the stored format."""
    cols = q.shape[1]
    return Quantized((_pack4(q) if bits == 4 else q).contiguous(), d.to(torch.float32).contiguous(), bits, group, cols)


def _pack4(q: torch.Tensor) -> torch.Tensor:
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[1] % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [out, ⌈cols/2⌉] → int8 [out, cols] in [-8, 7]."""
    lo = (packed & 0xF).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).view(packed.shape[0], -1)[:, :cols]


def levels(qw: Quantized) -> torch.Tensor:
    """The integer levels, int8 [out, cols], whatever the packing."""
    return unpack4(qw.q, qw.cols) if qw.bits == 4 else qw.q


def dequantize(qw: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight the kernels must reproduce: levels × their group's scale."""
    q = levels(qw).to(dtype)
    d = qw.scales.to(dtype).repeat_interleave(qw.group, dim=1)[:, : qw.cols]
    return q * d


def column_prefix(qw: Quantized, cols: int) -> Quantized:
    """The first `cols` input channels (A's rank prefix), without requantising."""
    if not 0 < cols <= qw.cols:
        raise ValueError(f"column prefix must be in [1, {qw.cols}], got {cols}")
    q = levels(qw)[:, :cols]
    if qw.bits == 4:
        q = _pack4(q)
    return Quantized(q.contiguous(), qw.scales[:, : n_groups(cols, qw.group)].contiguous(), qw.bits, qw.group, cols)


def row_prefix(qw: Quantized, rows: int) -> Quantized:
    """The first `rows` output channels (B's rank prefix)."""
    if not 0 < rows <= qw.q.shape[0]:
        raise ValueError(f"row prefix must be in [1, {qw.q.shape[0]}], got {rows}")
    return Quantized(qw.q[:rows].contiguous(), qw.scales[:rows].contiguous(), qw.bits, qw.group, qw.cols)



def quantize_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] as the native VNNI GEMM rounds it (kernels/cpu/gemm.c), dequantised: per row and group
    of `group` inputs, the int8 vector rounding the KV cache uses (kernels.kv_quant)."""
    from .kv_quant import dequantize_vectors, quantize_vectors

    m, cols = x.shape
    levels, scales = quantize_vectors(_grouped(x.float(), group))  # zero padding leaves max|x| as it is
    return dequantize_vectors(levels, scales).view(m, -1)[:, :cols]
