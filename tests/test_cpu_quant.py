"""The native CPU GEMMs on int8 / int4 weights (kernels.cpu.gemm.pack_quantized) against the
float64 product of the dequantised weights (kernels.quant), and a quantised model served through
them. tests/test_cpu_isa.py runs the same GEMM comparison on every x86 level the CPU executes."""

import os
import shutil

import pytest
import torch

from kernels.cpu import build as cpu_native
from kernels.cpu.gemm import can_pack_quantized, int8_products, pack, pack_quantized, packed_linear, packed_lowrank
from kernels.quant import column_prefix, dequantize, quantize, quantize_activations

pytestmark = [pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler"),
              pytest.mark.skipif(os.environ.get(cpu_native.DISABLE_ENV) == "0",
                                 reason=f"{cpu_native.DISABLE_ENV}=0 turns the native kernels off")]
SHAPES = [(96, 40, 7), (37, 131, 33), (200, 64, 16), (5, 6, 1)]  # (out, in, rank): partial panels, short groups


def check_quantized_gemms(rows: int, bits: int, group: int) -> None:
    """packed_linear and packed_lowrank on quantised weights equal float64 on their dequantised
    weights, within float32 accumulation (the kernels widen the levels to float32)."""
    for out_f, in_f, rank in SHAPES:
        w, bias = torch.randn(out_f, in_f), torch.randn(out_f)
        x = torch.randn(rows, in_f)
        qw = quantize(w, bits, group)
        want = x.double() @ dequantize(qw, torch.float64).T + bias.double()
        torch.testing.assert_close(packed_linear(x, pack_quantized(qw), bias).double(), want, atol=1e-4, rtol=1e-4)
        qA, qB = quantize(torch.randn(out_f, rank), bits, group), quantize(torch.randn(rank, in_f), bits, group)
        low = (x.double() @ dequantize(qB, torch.float64).T) @ dequantize(qA, torch.float64).T + bias.double()
        got = packed_lowrank(x, pack_quantized(qB), pack_quantized(qA), bias).double()
        torch.testing.assert_close(got, low, atol=1e-4 * rank ** 0.5, rtol=1e-4)
        mixed = packed_lowrank(x, pack(dequantize(qB)), pack_quantized(qA), bias).double()  # one factor float
        torch.testing.assert_close(mixed, low, atol=1e-4 * rank ** 0.5, rtol=1e-4)


@pytest.mark.parametrize("bits,group", [(8, 32), (8, 64), (4, 32), (4, 2), (8, 6)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16, 17, 40, 130])
def test_quantized_gemms_match_float64(rows, bits, group):
    check_quantized_gemms(rows, bits, group)


def check_int8_activation_gemms(rows: int, bits: int, group: int) -> None:
    """Weights packed for int8 activations: where the library has VNNI, from VNNI_MIN_ROWS rows and
    for groups of a multiple of 8, packed_linear equals float64 on the rounded rows
    (quantize_activations) and the dequantised weight, and the fused low-rank call equals its two
    GEMMs one after the other (the intermediate rounded again); elsewhere, the float result."""
    integer = int8_products() and rows >= cpu_native.constant("VNNI_MIN_ROWS") and group % 8 == 0
    for out_f, in_f, rank in SHAPES:
        w, bias = torch.randn(out_f, in_f), torch.randn(out_f)
        x = torch.randn(rows, in_f) * torch.logspace(-2, 2, in_f)  # groups of very different magnitudes
        qw = quantize(w, bits, group)
        rounded = quantize_activations(x, group) if integer else x
        want = rounded.double() @ dequantize(qw, torch.float64).T + bias.double()
        got = packed_linear(x, pack_quantized(qw, int8_activations=True), bias).double()
        torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-5)
        qA, qB = quantize(torch.randn(out_f, rank), bits, group), quantize(torch.randn(rank, in_f), bits, group)
        pB, pA = pack_quantized(qB, int8_activations=True), pack_quantized(qA, int8_activations=True)
        two_calls = packed_linear(packed_linear(x, pB), pA, bias)
        torch.testing.assert_close(packed_lowrank(x, pB, pA, bias), two_calls, atol=0, rtol=0)


@pytest.mark.parametrize("bits,group", [(8, 32), (8, 64), (4, 32), (4, 64), (4, 6)])
@pytest.mark.parametrize("rows", [3, 4, 5, 12, 13, 40, 130])
def test_int8_activation_gemms_match_float64(rows, bits, group):
    check_int8_activation_gemms(rows, bits, group)


def test_int8_activations_change_the_product_where_the_cpu_multiplies_in_integers():
    """Not a no-op: with VNNI the rounded rows give a different product than float32 rows."""
    if not int8_products():
        pytest.skip("this CPU (or build) has no VNNI: int8 activations are never used here")
    qw = quantize(torch.randn(64, 256), 8, 64)
    x = torch.randn(16, 256)
    exact = packed_linear(x, pack_quantized(qw))
    assert not torch.equal(packed_linear(x, pack_quantized(qw, int8_activations=True)), exact)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_prefix_of_a_quantized_factor_packs_and_matches(bits):
    A = torch.randn(70, 45)
    x = torch.randn(3, 33)
    for rank in (1, 2, 31, 32, 33):  # inside the first group, at its end, one into the second
        prefix = column_prefix(quantize(A, bits, 32), rank)
        want = x[:, :rank].double() @ dequantize(prefix, torch.float64).T
        torch.testing.assert_close(packed_linear(x[:, :rank].contiguous(), pack_quantized(prefix)).double(), want,
                                   atol=1e-4, rtol=1e-4)


def test_only_float32_scales_pack():
    qw = quantize(torch.randn(8, 32), 8, 32)
    assert can_pack_quantized(qw)
    half = type(qw)(qw.q, qw.scales.half(), qw.bits, qw.group, qw.cols)
    assert not can_pack_quantized(half)
    with pytest.raises(ValueError, match="float32 scales"):
        pack_quantized(half)
