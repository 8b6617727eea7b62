"""The Triton GEMMs on int8 / int4 weights (kernels.lowrank_gemm: quantized_linear_triton,
quantized_lowrank_triton) against float64 on the dequantised weights: under the interpreter here,
compiled on a GPU (bench/gpu.sh runs this file there)."""

import os

import pytest
import torch

from kernels import quantized_linear, quantized_lowrank
from kernels.lowrank_gemm import quantized_linear_triton, quantized_lowrank_triton
from kernels.quant import Quantized, column_prefix, dequantize, quantize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the Triton kernels need a GPU or TRITON_INTERPRET=1")


def _on_device(qw: Quantized, dtype: torch.dtype = torch.float32) -> Quantized:
    """The weight on DEVICE with its scales in the serving dtype, as the loader leaves it."""
    return Quantized(qw.q.to(DEVICE), qw.scales.to(DEVICE, dtype), qw.bits, qw.group, qw.cols)
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=1e-1, rtol=5e-2)}


def _deq(qw):
    return dequantize(qw, torch.float64).cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group", [(8, 32), (4, 32), (4, 6)])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_quantized_kernels_match_float64(rows, bits, group, dtype):
    for out_f, in_f, rank in [(37, 131, 33), (96, 40, 7)]:
        qW, qA, qB = (_on_device(quantize(torch.randn(*shape) * 0.2, bits, group), dtype)
                      for shape in ((out_f, in_f), (out_f, rank), (rank, in_f)))
        x, bias = torch.randn(rows, in_f).to(dtype), torch.randn(out_f).to(dtype)
        y = quantized_linear_triton(x.to(DEVICE), qW, bias.to(DEVICE))
        assert y.dtype == dtype and y.shape == (rows, out_f)
        torch.testing.assert_close(y.double().cpu(), x.double() @ _deq(qW).T + bias.double(), **TOL[dtype])
        low = quantized_lowrank_triton(x.to(DEVICE), qA, qB, bias.to(DEVICE))
        want = (x.double() @ _deq(qB).T) @ _deq(qA).T + bias.double()
        assert low.dtype == dtype
        torch.testing.assert_close(low.double().cpu(), want, **TOL[dtype])


@pytest.mark.parametrize("bits", [8, 4])
def test_a_rank_prefix_and_batched_inputs(bits):
    qB = quantize(torch.randn(45, 64), bits, 32)
    full_A = quantize(torch.randn(50, 45), bits, 32)
    x = torch.randn(2, 3, 64)
    for rank in (1, 31, 33):
        A = _on_device(column_prefix(full_A, rank))
        B = _on_device(Quantized(qB.q[:rank], qB.scales[:rank], bits, 32, 64))
        got = quantized_lowrank_triton(x.to(DEVICE), A, B)
        assert got.shape == (2, 3, 50)
        want = (x.double() @ _deq(B).T) @ _deq(A).T
        torch.testing.assert_close(got.double().cpu(), want, atol=1e-4, rtol=1e-4)


def test_the_dispatch_takes_the_reference_where_x_needs_gradients():
    qW = _on_device(quantize(torch.randn(20, 32), 8, 32))
    x = torch.randn(3, 32, device=DEVICE, requires_grad=True)
    y = quantized_linear(x, qW)
    y.sum().backward()
    torch.testing.assert_close(x.grad, dequantize(qW).sum(0).expand(3, -1))
    with torch.no_grad():
        torch.testing.assert_close(quantized_linear(x, qW), y)
        qA, qB = _on_device(quantize(torch.randn(20, 5), 4, 2)), _on_device(quantize(torch.randn(5, 32), 4, 32))
        torch.testing.assert_close(quantized_lowrank(x, qA, qB), x @ dequantize(qB).T @ dequantize(qA).T,
                                   atol=1e-4, rtol=1e-4)


def test_mismatched_shapes_name_them():
    qW = _on_device(quantize(torch.randn(20, 32), 8, 32))
    with pytest.raises(ValueError, match=r"must be \[\.\.\., 32\]"):
        quantized_linear_triton(torch.randn(3, 31, device=DEVICE), qW)
    with pytest.raises(ValueError, match="do not chain"):
        quantized_lowrank_triton(torch.randn(3, 32, device=DEVICE), _on_device(quantize(torch.randn(20, 4), 8, 32)), qW)
