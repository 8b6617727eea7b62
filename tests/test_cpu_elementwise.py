"""Native RMSNorm and RoPE (kernels.cpu.elementwise) against float64 references of what the torch
paths (engine.model.layers.RMSNorm, engine.model.rope.apply_rope) compute."""

import os
import shutil

import pytest
import torch

from engine.model.rope import apply_rope
from kernels.cpu import build as cpu_native
from kernels.cpu.elementwise import native_elementwise_available, rms_norm, rope

pytestmark = [pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler"),
              pytest.mark.skipif(os.environ.get(cpu_native.DISABLE_ENV) == "0",
                                 reason=f"{cpu_native.DISABLE_ENV}=0 turns the native kernels off")]


@pytest.mark.parametrize("shape", [(1, 8), (16, 576), (300, 96), (2, 3, 40), (0, 16)])
def test_rms_norm_matches_float64(shape):
    x, w = 3 * torch.randn(shape), torch.randn(shape[-1])
    want = w.double() * x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    got = rms_norm(x, w, 1e-5)
    assert got.shape == x.shape
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens,heads,dim", [(1, 1, 2), (16, 9, 64), (300, 3, 128), (5, 2, 16), (0, 4, 8)])
def test_rope_matches_float64(tokens, heads, dim):
    x = torch.randn(tokens, heads, dim)
    angles = torch.randn(tokens, dim // 2).repeat(1, 2) * 10
    cos, sin = angles.cos(), angles.sin()
    want = apply_rope(x.double(), cos.double(), sin.double())
    torch.testing.assert_close(rope(x, cos, sin).double(), want, atol=1e-5, rtol=1e-5)


def test_non_contiguous_inputs_are_taken():
    x = torch.randn(8, 64, 6).transpose(1, 2)  # (8, 6, 64) strided
    cos, sin = torch.randn(8, 64), torch.randn(8, 64)
    torch.testing.assert_close(rope(x, cos, sin), apply_rope(x, cos, sin), atol=1e-6, rtol=1e-6)
    y = torch.randn(64, 10).T
    w = torch.randn(64)
    want = w * y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(rms_norm(y, w, 1e-6), want, atol=1e-6, rtol=1e-6)


def test_what_the_kernels_cannot_compute_is_refused():
    assert native_elementwise_available(torch.float32) and not native_elementwise_available(torch.bfloat16)
    with pytest.raises(ValueError, match="float64"):
        rms_norm(torch.randn(2, 4, dtype=torch.float64), torch.randn(4), 1e-5)
    with pytest.raises(ValueError, match="3 values for 4 features"):
        rms_norm(torch.randn(2, 4), torch.randn(3), 1e-5)
    with pytest.raises(ValueError, match=r"cos/sin of shape \(2, 8\)"):
        rope(torch.randn(2, 3, 8), torch.randn(2, 6), torch.randn(2, 6))
