"""GPTQ rounding (converters.gptq) in the stored format: no feedback without correlation, less
output error than round-to-nearest on correlated inputs, rows independent."""

import pytest
import torch

from converters.gptq import gptq_quantize
from kernels.quant import dequantize, levels, quantize


def _correlated_inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=gen, dtype=torch.float64) / width ** 0.5
    scale = torch.logspace(0, -2, width, dtype=torch.float64)  # a spread spectrum, as activations have
    return torch.randn(tokens, width, generator=gen, dtype=torch.float64) @ (mix * scale)


def _output_error(X, w, qw) -> float:
    return ((X @ (w.double() - dequantize(qw, torch.float64)).T) ** 2).sum().item()


@pytest.mark.parametrize("bits,group", [(8, 32), (4, 32), (4, 16)])
def test_uncorrelated_inputs_give_round_to_nearest(bits, group):
    w = torch.randn(24, 70)
    qw = gptq_quantize(w, torch.eye(70, dtype=torch.float64) * 5.0, bits, group)
    rtn = quantize(w, bits, group)
    assert torch.equal(qw.q, rtn.q) and torch.equal(qw.scales, rtn.scales) and qw.cols == 70


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits,group", [(8, 32), (4, 32), (4, 64)])
def test_less_output_error_than_round_to_nearest(seed, bits, group):
    X = _correlated_inputs(512, 96, seed)
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(100 + seed))
    qw = gptq_quantize(w, X.T @ X, bits, group)
    assert levels(qw).abs().max() <= (127 if bits == 8 else 8)
    assert _output_error(X, w, qw) < 0.8 * _output_error(X, w, quantize(w, bits, group))


def test_rows_are_independent_so_a_row_prefix_is_the_prefix_s_result():
    X = _correlated_inputs(256, 64, 9)
    w, H = torch.randn(30, 64), X.T @ X
    full, prefix = gptq_quantize(w, H, 4, 32), gptq_quantize(w[:11], H, 4, 32)
    assert torch.equal(full.q[:11], prefix.q) and torch.equal(full.scales[:11], prefix.scales)


def test_dead_inputs_and_bad_grams():
    X = _correlated_inputs(128, 40, 3)
    X[:, 7] = 0
    qw = gptq_quantize(torch.randn(8, 40), X.T @ X, 8, 8)
    assert torch.isfinite(qw.scales).all()
    with pytest.raises(ValueError, match=r"the Gram must be \[40, 40\]"):
        gptq_quantize(torch.randn(8, 40), torch.eye(39, dtype=torch.float64), 8, 8)
