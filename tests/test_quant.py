"""The group-quantisation format (kernels.quant): round-trip bounds, packing, rank prefixes."""

import pytest
import torch

from kernels.quant import column_prefix, dequantize, levels, quantize, row_prefix, unpack4


def _weight(seed: int, out: int, cols: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g, dtype=torch.float64)
    w[:, : cols // 3] *= 40  # groups of very different scales, as bake's balanced factors have
    return w


def _group_scale(qw, cols: int) -> torch.Tensor:
    return qw.scales.to(torch.float64).abs().repeat_interleave(qw.group, dim=1)[:, :cols]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("cols,group", [(64, 32), (96, 64), (37, 32), (5, 4), (130, 64)])
def test_int8_error_is_at_most_half_a_step(seed, cols, group):
    w = _weight(seed, 7, cols)
    qw = quantize(w, 8, group)
    assert qw.q.dtype == torch.int8 and qw.q.shape == (7, cols)
    assert qw.scales.shape == (7, -(-cols // group))
    assert levels(qw).abs().max() <= 127
    err = (dequantize(qw, torch.float64) - w).abs()
    step = _group_scale(qw, cols)
    assert torch.all(err <= step / 2 * (1 + 1e-6) + 1e-12)
    # every group's largest magnitude is represented (to float32 rounding of its scale)
    assert torch.allclose(dequantize(qw, torch.float64).abs().amax(1), w.abs().amax(1), rtol=1e-6)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("cols,group", [(64, 32), (37, 32), (5, 4), (131, 64)])
def test_int4_error_and_levels(seed, cols, group):
    w = _weight(seed, 6, cols)
    qw = quantize(w, 4, group)
    assert qw.q.dtype == torch.uint8 and qw.q.shape == (6, -(-cols // 2))
    q = levels(qw)
    assert q.shape == (6, cols) and q.min() >= -8 and q.max() <= 7
    step = _group_scale(qw, cols)
    err = (dequantize(qw, torch.float64) - w).abs()
    rel = w / (qw.scales.to(torch.float64).repeat_interleave(group, dim=1)[:, :cols])
    clamped = rel > 7.5  # the opposite-signed twin of the largest magnitude rounds to 8, kept at 7
    assert torch.all(err[~clamped] <= step[~clamped] / 2 * (1 + 1e-6) + 1e-12)
    assert torch.all(err[clamped] <= step[clamped] * (1 + 1e-6))
    # the largest magnitude of each group maps to -8 exactly: all 16 levels are in use
    assert torch.all((q == -8).view(6, -1).any(dim=1))


def test_int4_packing_is_low_nibble_first():
    w = torch.tensor([[-8.0, 7.0, 0.0, 1.0, -1.0]])  # group 6 > width: one short group, d = 1
    qw = quantize(w, 4, 6)
    assert qw.scales.item() == 1.0
    assert qw.q.tolist() == [[0 | (15 << 4), 8 | (9 << 4), 7 | (8 << 4)]]
    assert unpack4(qw.q, 5).tolist() == [[-8, 7, 0, 1, -1]]


@pytest.mark.parametrize("bits", [8, 4])
def test_zero_groups_dequantise_to_zero(bits):
    w = torch.zeros(3, 40)
    w[1, 35] = 2.0
    deq = dequantize(quantize(w, bits, 32))
    assert torch.isfinite(deq).all() and deq[0].abs().sum() == 0 and deq[1, 35] == 2.0


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("keep", [1, 31, 32, 33, 57, 70])
def test_rank_prefixes_equal_the_prefix_of_the_dequantised_factor(bits, keep):
    """A [out, r] loses columns, B [r, in] loses rows: neither needs requantising."""
    a = quantize(_weight(5, 24, 70), bits, 32)
    b = quantize(_weight(6, 70, 48), bits, 32)
    assert torch.equal(dequantize(column_prefix(a, keep)), dequantize(a)[:, :keep])
    assert torch.equal(dequantize(row_prefix(b, keep)), dequantize(b)[:keep])


@pytest.mark.parametrize("bits,group,message", [(3, 32, "bits must be one of 8, 4"),
                                                (8, 31, "group must be an even integer"),
                                                (4, 0, "group must be an even integer")])
def test_bad_arguments_name_the_problem(bits, group, message):
    with pytest.raises(ValueError, match=message):
        quantize(torch.ones(2, 8), bits, group)


def test_prefix_bounds_are_checked():
    qw = quantize(torch.ones(4, 8), 8, 4)
    with pytest.raises(ValueError, match="column prefix"):
        column_prefix(qw, 9)
    with pytest.raises(ValueError, match="row prefix"):
        row_prefix(qw, 0)
