"""Low-rank GEMM y = ((x·Bᵀ) ⊙ scale[:rank]) · A[:, :rank]ᵀ + bias, as a shrink + expand pair.

Shrink: t = (x·Bᵀ) ⊙ s, tiled over (rows, rank) and split along `in` when the grid would
otherwise leave the GPU idle (decode: one row block, a few rank blocks). Each split writes its
own fp32 partial; the expand kernel sums the partials as it loads t: deterministic, no atomics,
no zeroed buffer, and the only round trip through memory is the small [splits, M, r] t.
Expand: y = t·Aᵀ + bias, tiled over (rows, out) with the full-rank loop inside.
Both read A and B exactly once from HBM in decode; both use `tl.dot` (fp32 accumulation).

`lowrank_gemm_triton` is the Triton launcher, `LowRankGEMM` its autograd function (grads for x, the
scale, A, B and the bias: SoCo trains the scale, healing the factors), `lowrank_gemm_ref` the
plain-torch reference and CPU path.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
import triton.testing

from .interpreter import INTERPRET
from .quant import Quantized, dequantize

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Split `in` until the shrink grid has about this many programs per SM.
PROGRAMS_PER_SM = 2
SPLIT_ALIGN = 256  # every split but the last covers a multiple of the largest BLOCK_K


# LOWRANK_AUTOTUNE=0: the pinned config on a GPU too (correctness runs: bench/gpu.sh's tests
# stage would spend minutes tuning ~150 shapes it only checks).
AUTOTUNE = os.environ.get("LOWRANK_AUTOTUNE", "1").strip() != "0"
TUNE_WARMUP_MS, TUNE_REP_MS = 5, 20  # per config and shape: Triton's defaults (25, 100) cost ~0.13 s each


def _configs(pinned: dict, tuned: list[tuple[dict, int, int]]) -> list[triton.Config]:
    """One pinned config under the interpreter (autotune needs a GPU driver) or with autotuning
    off, the sweep on a GPU."""
    if INTERPRET or not AUTOTUNE:
        return [triton.Config(pinned, num_warps=4, num_stages=1)]
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in tuned]


def _quick_bench(kernel_call, quantiles):
    """Autotuning's timing of one config: shorter than Triton's default, enough to rank 8 configs."""
    return triton.testing.do_bench(kernel_call, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=quantiles)


def _prune_rows(configs, named_args, **kwargs):
    """Decode (<= 16 rows) tries only 16-row blocks, more rows only the big ones: padded rows are wasted work."""
    small = named_args["M_BUCKET"] <= 16
    return [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == small] or configs


SHRINK_CONFIGS = _configs(
    {"BLOCK_M": 16, "BLOCK_R": 64, "BLOCK_K": 64},
    [({"BLOCK_M": 16, "BLOCK_R": r, "BLOCK_K": k}, 4, s) for r in (32, 64) for k in (128, 256) for s in (3, 4)]
    + [({"BLOCK_M": m, "BLOCK_R": r, "BLOCK_K": 64}, w, 3) for m in (64, 128) for r in (64, 128) for w in (4, 8)],
)
EXPAND_CONFIGS = _configs(
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_R": 64},
    [({"BLOCK_M": 16, "BLOCK_N": n, "BLOCK_R": r}, 4, s) for n in (32, 64) for r in (64, 128) for s in (3, 4)]
    + [({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_R": 64}, w, 3) for m in (64, 128) for n in (64, 128) for w in (4, 8)],
)


@triton.jit
def _dequantized(q_ptr, d_ptr, rows, cols, stride_q, stride_d, mask, BITS: tl.constexpr, GROUP: tl.constexpr):
    """The float32 weights at (rows, cols) (broadcast index tensors) of a group-quantised matrix
    (kernels.quant): int8 levels [rows, cols], or int4 levels two per byte along cols (the even
    column in the low nibble, stored +8), times the scale of each one's group of GROUP columns."""
    if BITS == 8:
        q = tl.load(q_ptr + rows * stride_q + cols, mask=mask, other=0).to(tl.float32)
    else:
        packed = tl.load(q_ptr + rows * stride_q + cols // 2, mask=mask, other=8).to(tl.int32)
        q = ((packed >> ((cols % 2) * 4)) & 15).to(tl.float32) - 8.0
    return q * tl.load(d_ptr + rows * stride_d + cols // GROUP, mask=mask, other=0.0).to(tl.float32)


@triton.autotune(SHRINK_CONFIGS, key=["M_BUCKET", "R", "K", "SPLITS"], prune_configs_by={"early_config_prune": _prune_rows},
                 do_bench=_quick_bench)
@triton.jit
def _shrink_kernel(
    x_ptr, w_ptr, s_ptr, t_ptr, d_ptr,
    M, R, K, K_PER_SPLIT, M_BUCKET, SPLITS,
    stride_xm, stride_xk, stride_wr, stride_wk, stride_ts, stride_tm, stride_dr,
    HAS_SCALE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """t[split, m, r] = sum over this split's k of x[m, k]·w[r, k], times s[r]; w float, or
    (BITS 8 / 4) group-quantised levels dequantised here with their scales d[r, k // GROUP]."""
    pid_m, pid_r, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        in_k = offs_k < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m < M)[:, None] & in_k[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        w_mask = (offs_r < R)[None, :] & in_k[:, None]
        if BITS == 32:
            w = tl.load(w_ptr + offs_r[None, :] * stride_wr + offs_k[:, None] * stride_wk,
                        mask=w_mask, other=0.0)  # (BLOCK_K, BLOCK_R)
        else:
            w = _dequantized(w_ptr, d_ptr, offs_r[None, :], offs_k[:, None], stride_wr, stride_dr, w_mask,
                             BITS, GROUP).to(x.dtype)
        if UPCAST:  # the interpreter's bf16 dot is wrong: do it in fp32 there
            x, w = x.to(tl.float32), w.to(tl.float32)
        if IEEE:  # fp32 inputs: no silent TF32
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    if HAS_SCALE:
        acc *= tl.load(s_ptr + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)[None, :]
    t_ptrs = t_ptr + pid_s * stride_ts + offs_m[:, None] * stride_tm + offs_r[None, :]
    tl.store(t_ptrs, acc, mask=(offs_m < M)[:, None] & (offs_r < R)[None, :])


@triton.autotune(EXPAND_CONFIGS, key=["M_BUCKET", "N", "R", "SPLITS"], prune_configs_by={"early_config_prune": _prune_rows},
                 do_bench=_quick_bench)
@triton.jit
def _expand_kernel(
    t_ptr, a_ptr, bias_ptr, y_ptr, d_ptr,
    M, N, R, M_BUCKET, SPLITS,
    stride_ts, stride_tm, stride_an, stride_ar, stride_ym, stride_dn,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[m, n] = sum_r (sum over splits of t[split, m, r])·a[n, r] + bias[n]; a float, or (BITS 8 / 4)
    group-quantised levels dequantised here with their scales d[n, r // GROUP], in y's dtype."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(0, R, BLOCK_R):
        offs_r = r + tl.arange(0, BLOCK_R)
        t_mask = (offs_m < M)[:, None] & (offs_r < R)[None, :]
        t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :]
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for s in range(0, SPLITS):
            t += tl.load(t_ptrs + s * stride_ts, mask=t_mask, other=0.0)
        a_mask = (offs_n < N)[None, :] & (offs_r < R)[:, None]
        if BITS == 32:
            a = tl.load(a_ptr + offs_n[None, :] * stride_an + offs_r[:, None] * stride_ar,
                        mask=a_mask, other=0.0)  # (BLOCK_R, BLOCK_N)
        else:
            a = _dequantized(a_ptr, d_ptr, offs_n[None, :], offs_r[:, None], stride_an, stride_dn, a_mask,
                             BITS, GROUP).to(y_ptr.dtype.element_ty)
        if UPCAST:
            a = a.to(tl.float32)
        else:  # t meets A in A's dtype, as it would between two cuBLAS GEMMs
            t = t.to(a.dtype)
        if IEEE:
            acc = tl.dot(t, a, acc, input_precision="ieee")
        else:
            acc = tl.dot(t, a, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def _sm_count(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 4  # a small pretend GPU, so the interpreter exercises the split path on CI shapes
    return torch.cuda.get_device_properties(device).multi_processor_count


def _bucket(m: int) -> int:
    """Autotune key for the row count: powers of two, so a new batch size rarely retunes."""
    return min(triton.next_power_of_2(m), 4096)


def _flags(dtype: torch.dtype) -> dict:
    upcast = INTERPRET and dtype == torch.bfloat16  # the interpreter's bf16 dot is wrong
    return {"UPCAST": upcast, "IEEE": upcast or dtype == torch.float32}


def _quant_args(w: torch.Tensor | Quantized) -> tuple:
    """(levels or float weight, its scales or None, scales' row stride, BITS, GROUP) for a launch."""
    if isinstance(w, Quantized):
        return w.q, w.scales, w.scales.stride(0), w.bits, w.group
    return w, None, 0, 32, 1


def _shrink(x: torch.Tensor, w: torch.Tensor | Quantized, scale: torch.Tensor | None) -> torch.Tensor:
    """x [M, K], w [R, K] (float with any strides, or quantised) -> fp32 partials [splits, M, R]
    with (x·wᵀ) ⊙ scale = their sum."""
    M, K = x.shape
    R = w.q.shape[0] if isinstance(w, Quantized) else w.shape[0]
    w, scales, stride_d, bits, group = _quant_args(w)
    row_blocks, rank_blocks = triton.cdiv(M, 64 if M > 16 else 16), triton.cdiv(R, 64)
    wanted = max(1, PROGRAMS_PER_SM * _sm_count(x.device) // (row_blocks * rank_blocks))
    k_per_split = triton.cdiv(triton.cdiv(K, min(wanted, triton.cdiv(K, SPLIT_ALIGN))), SPLIT_ALIGN) * SPLIT_ALIGN
    splits = triton.cdiv(K, k_per_split)
    t = torch.empty(splits, M, R, device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, meta["BLOCK_R"]), splits)  # noqa: E731
    _shrink_kernel[grid](
        x, w, scale if scale is not None else t, t, scales if scales is not None else t,
        M, R, K, k_per_split, _bucket(M), splits,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), t.stride(0), t.stride(1), stride_d,
        HAS_SCALE=scale is not None, BITS=bits, GROUP=group, **_flags(x.dtype),
    )
    return t


def _expand(t: torch.Tensor, a: torch.Tensor | Quantized, bias: torch.Tensor | None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """Partials t [splits, M, R] (fp32, or one split in any float dtype), a [N, R] (float with any
    strides, or quantised) -> y [M, N] = (Σ t)·aᵀ + bias in a's dtype (a quantised a: `dtype`)."""
    splits, M, R = t.shape
    N = a.q.shape[0] if isinstance(a, Quantized) else a.shape[0]
    a, scales, stride_d, bits, group = _quant_args(a)
    dtype = a.dtype if bits == 32 else dtype
    y = torch.empty(M, N, device=t.device, dtype=dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    _expand_kernel[grid](
        t, a, bias if bias is not None else y, y, scales if scales is not None else y,
        M, N, R, _bucket(M), splits,
        t.stride(0), t.stride(1), a.stride(0), a.stride(1), y.stride(0), stride_d,
        HAS_BIAS=bias is not None, BITS=bits, GROUP=group, **_flags(dtype),
    )
    return y


def check_lowrank_args(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None,
    rank: int | None,
) -> int:
    """Validate shapes; return the rank to use. Errors name the tensors and their shapes."""
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0]:
        raise ValueError(f"A must be [out, r] and B [r, in], got A {tuple(A.shape)} and B {tuple(B.shape)}")
    if x.dim() == 0 or x.shape[-1] != B.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} must be [..., in] with in = {B.shape[1]} from B {tuple(B.shape)}")
    r = B.shape[0] if rank is None else rank
    if not 0 <= r <= B.shape[0]:
        raise ValueError(f"rank must be in [0, {B.shape[0]}] for B {tuple(B.shape)}, got {rank}")
    if scale is not None and (scale.dim() != 1 or scale.shape[0] < r):
        raise ValueError(f"scale must be [r >= {r}], got scale {tuple(scale.shape)}")
    if bias is not None and bias.shape != (A.shape[0],):
        raise ValueError(f"bias must be [{A.shape[0]}] for A {tuple(A.shape)}, got bias {tuple(bias.shape)}")
    # Plain comparisons first: this runs once per linear per step, so the messages are built only on failure.
    device, dtype = x.device, x.dtype
    others = (A, B) if bias is None else (A, B, bias)
    if any(t.device != device for t in others) or (scale is not None and scale.device != device):
        tensors = {"x": x, "A": A, "B": B, "bias": bias, "scale": scale}
        raise ValueError("tensors on different devices: " + ", ".join(
            f"{k} {tuple(v.shape)} on {v.device}" for k, v in tensors.items() if v is not None))
    if any(t.dtype != dtype for t in others) or not x.is_floating_point():  # the scale may stay fp32
        tensors = {"x": x, "A": A, "B": B, "bias": bias}
        raise ValueError("x, A, B and bias must share one floating dtype: " + ", ".join(
            f"{k} {tuple(v.shape)} {v.dtype}" for k, v in tensors.items() if v is not None))
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
    if r < B.shape[0]:  # slicing costs a microsecond per view: only when a limit applies
        A, B, scale = A[:, :r], B[:r], None if scale is None else scale[:r]
    t = x @ B.T  # (..., r)
    if scale is not None:
        t = t * scale.to(t.dtype)
    y = t @ A.T  # (..., out)
    return y if bias is None else y + bias


def _products(use_triton: bool):
    """(x·wᵀ ⊙ s, t·aᵀ + b) on 2-D operands: the kernels, or torch for the float64 gradcheck."""
    if use_triton:
        return (lambda x, w, s: _shrink(x, w, s).sum(0)), (lambda t, a, b: _expand(t[None], a, b))

    def shrink(x, w, s):
        t = x @ w.T
        return t if s is None else t * s.to(t.dtype)

    def expand(t, a, b):
        y = t.to(a.dtype) @ a.T
        return y if b is None else y + b

    return shrink, expand


class LowRankGEMM(torch.autograd.Function):
    """y = ((x·Bᵀ) ⊙ s)·Aᵀ + b, differentiable in x, s, A, B and b (each only when it requires grad).

    With g = dy·A (rows × r) and u = x·Bᵀ:
      dL/dx = (g ⊙ s)·B    dL/ds = Σ_rows g ⊙ u    dL/dA = dyᵀ·(u ⊙ s)    dL/dB = (g ⊙ s)ᵀ·x    dL/db = Σ_rows dy
    Every product is a shrink (a·wᵀ over some contraction) or an expand, so backward runs on the
    same two kernels as forward; components past `rank` get zero gradients.
    """

    @staticmethod
    def forward(ctx, x, A, B, bias, scale, rank: int, use_triton: bool):
        shrink, expand = _products(use_triton)
        x2 = x.reshape(-1, x.shape[-1])
        y = expand(shrink(x2, B[:rank], None if scale is None else scale[:rank]), A[:, :rank], bias)
        ctx.save_for_backward(x, A, B, scale)
        ctx.rank, ctx.use_triton = rank, use_triton
        return y.reshape(*x.shape[:-1], A.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, A, B, scale = ctx.saved_tensors
        r = ctx.rank
        needs_x, needs_A, needs_B, needs_bias, needs_scale = ctx.needs_input_grad[:5]
        shrink, expand = _products(ctx.use_triton)
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]).to(x.dtype)
        s = None if scale is None else scale[:r]
        grad_x = grad_A = grad_B = grad_bias = grad_scale = None
        if needs_x or needs_B or needs_scale:
            g = shrink(dy2, A[:, :r].T, None)  # (rows, r) fp32 on the kernel path
            gs = (g if s is None else g * s.to(g.dtype)).to(x.dtype)
        if needs_A or needs_scale:
            u = shrink(x2, B[:r], None)  # recomputed: cheaper than keeping (rows, r) alive
        if needs_x:
            grad_x = expand(gs, B[:r].T, None).reshape(x.shape)
        if needs_A:
            us = (u if s is None else u * s.to(u.dtype)).to(x.dtype)
            grad_A = torch.zeros_like(A)
            grad_A[:, :r] = shrink(dy2.T, us.T, None).to(A.dtype)  # dyᵀ·(u ⊙ s): contracts over rows
        if needs_B:
            grad_B = torch.zeros_like(B)
            grad_B[:r] = shrink(gs.T, x2.T, None).to(B.dtype)  # (g ⊙ s)ᵀ·x
        if needs_bias:
            grad_bias = dy2.sum(0, dtype=torch.float32).to(A.dtype)
        if needs_scale:
            grad_scale = torch.zeros_like(scale)
            grad_scale[:r] = (g * u).sum(0).to(scale.dtype)
        return grad_x, grad_A, grad_B, grad_bias, grad_scale, None, None


def lowrank_gemm_triton(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    rank: int | None = None,
) -> torch.Tensor:
    """The Triton path of `lowrank_gemm_ref` (same signature); differentiable in every tensor argument."""
    r = check_lowrank_args(x, A, B, bias, scale, rank)
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes {KERNEL_DTYPES}, got x {tuple(x.shape)} {x.dtype}")
    if x.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the Triton kernel needs CUDA tensors or TRITON_INTERPRET=1, got x on {x.device}")
    if x.numel() == 0 or r == 0:
        return lowrank_gemm_ref(x, A, B, bias, scale, r)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, A, B, bias, scale)):
        return LowRankGEMM.apply(x, A, B, bias, scale, r, True)
    x2 = x.reshape(-1, x.shape[-1])
    y = _expand(_shrink(x2, B[:r], scale), A[:, :r], bias)
    return y.reshape(*x.shape[:-1], A.shape[0])


def quantized_linear_ref(x: torch.Tensor, W: Quantized, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] -> x·Wᵀ + bias for a group-quantised W [out, in] (kernels.quant), dequantised in x's dtype."""
    y = x @ dequantize(W, x.dtype).T
    return y if bias is None else y + bias


def quantized_lowrank_ref(x: torch.Tensor, A: Quantized, B: Quantized, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] -> (x·Bᵀ)·Aᵀ + bias for group-quantised factors, dequantised in x's dtype."""
    return lowrank_gemm_ref(x, dequantize(A, x.dtype), dequantize(B, x.dtype), bias)


def _check_quantized(x: torch.Tensor, *weights: Quantized) -> torch.Tensor:
    """x as contiguous rows [M, in] for the kernels, after checking what they read."""
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes {KERNEL_DTYPES}, got x {tuple(x.shape)} {x.dtype}")
    if x.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the Triton kernel needs CUDA tensors or TRITON_INTERPRET=1, got x on {x.device}")
    for w in weights:
        if w.q.stride(-1) != 1 or w.scales.stride(-1) != 1 or w.q.device != x.device:
            raise ValueError(f"quantised weights must be contiguous along their inputs and on {x.device}")
    return x.reshape(-1, x.shape[-1]).contiguous()


def quantized_linear_triton(x: torch.Tensor, W: Quantized, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton path of `quantized_linear_ref` (inference: no gradients). The shrink kernel with
    the weight's levels in place of B: split along `in` at decode sizes, the partials summed."""
    if x.shape[-1] != W.cols:
        raise ValueError(f"x {tuple(x.shape)} must be [..., {W.cols}] for W [{W.q.shape[0]}, {W.cols}]")
    x2 = _check_quantized(x, W)
    y = _shrink(x2, W, None).sum(0)
    y = (y if bias is None else y + bias).to(x.dtype)
    return y.reshape(*x.shape[:-1], W.q.shape[0])


def quantized_lowrank_triton(x: torch.Tensor, A: Quantized, B: Quantized,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton path of `quantized_lowrank_ref` (inference): both factors dequantised in the
    shrink and expand kernels as they load them."""
    if x.shape[-1] != B.cols or A.cols != B.q.shape[0]:
        raise ValueError(f"x {tuple(x.shape)}, A [{A.q.shape[0]}, {A.cols}] and B [{B.q.shape[0]}, {B.cols}] "
                         "do not chain as (x·Bᵀ)·Aᵀ")
    x2 = _check_quantized(x, A, B)
    y = _expand(_shrink(x2, B, None), A, bias, x.dtype)
    return y.reshape(*x.shape[:-1], A.q.shape[0])
