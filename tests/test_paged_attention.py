"""Paged attention's reference against dense float64 attention over each sequence's own K/V.

The cache is scattered: each sequence's blocks are shuffled through the pool, block tables are
padded with 0, and slots no sequence owns hold garbage, so a test fails if the gather reads the
wrong block, the wrong slot, or lets a masked key reach the output.
"""

import pytest
import torch

from conftest import dense_attention_ref
from kernels.paged_attention import paged_attention_ref

BLOCK = 16
HKV, D = 2, 8  # small heads: the long context, not the width, is what these tests exercise

# (dtype, atol, rtol) for outputs of magnitude ~1, the reference computed in float64 and cast.
TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, 2e-2, 2e-2),
    (torch.float16, 2e-2, 1e-2),
]
DTYPE_IDS = lambda v: str(v).removeprefix("torch.")  # noqa: E731

# (context_len, query_len) per sequence; query_len 1 = decode, < context = chunked prefill, = context = fresh.
BATCHES = {
    "decodes": [(1, 1), (15, 1), (16, 1), (17, 1), (63, 1), (65, 1)],
    "prefills": [(15, 15), (17, 17), (16, 5), (63, 2), (65, 64)],
    "mixed": [(17, 1), (63, 63), (1, 1), (65, 30), (16, 1), (15, 2), (64, 1)],
    "long": [(4099, 1), (16, 16), (4099, 7), (65, 1)],
}


def _paged(lens: list[int], dtype: torch.dtype, seed: int, garbage: float | None = None, spare: int = 3,
           zero_block_used: bool = True):
    """Dense K/V per sequence and the same K/V scattered through a shuffled block pool.

    Returns (ks, vs, k_cache, v_cache, block_tables). Slots no sequence owns (spare blocks, the
    tail of each last block) hold `garbage`, or stale random values when it is None. Tables are
    padded with 0 one column past the widest; block 0 is a live block of some sequence when
    zero_block_used (padding then aliases real keys), else a spare one.
    """
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // BLOCK) for n in lens]
    pool = sum(need) + spare
    ids = [b for b in torch.randperm(pool, generator=gen).tolist() if b != 0]
    ids.insert(int(torch.randint(sum(need), (1,), generator=gen)) if zero_block_used else pool - 1, 0)

    shape = (pool, BLOCK, HKV, D)
    if garbage is None:
        k_cache, v_cache = ((3 * torch.randn(shape, generator=gen)).to(dtype) for _ in range(2))  # stale values
    else:
        k_cache, v_cache = torch.full(shape, garbage, dtype=dtype), torch.full(shape, garbage, dtype=dtype)
    tables = torch.zeros(len(lens), max(need) + 1, dtype=torch.int32)
    ks, vs, used = [], [], 0
    for i, (n, nb) in enumerate(zip(lens, need)):
        k, v = torch.randn(n, HKV, D, generator=gen).to(dtype), torch.randn(n, HKV, D, generator=gen).to(dtype)
        blocks = ids[used: used + nb]
        used += nb
        tables[i, :nb] = torch.tensor(blocks)
        for j, b in enumerate(blocks):
            k_cache[b, : len(k[j * BLOCK:(j + 1) * BLOCK])] = k[j * BLOCK:(j + 1) * BLOCK]
            v_cache[b, : len(v[j * BLOCK:(j + 1) * BLOCK])] = v[j * BLOCK:(j + 1) * BLOCK]
        ks.append(k)
        vs.append(v)
    assert (0 in ids[:used]) == zero_block_used
    return ks, vs, k_cache, v_cache, tables


def _case(batch: str, group: int, dtype: torch.dtype, seed: int = 0, **paged):
    lens, query_lens = map(tuple, zip(*BATCHES[batch]))
    ks, vs, k_cache, v_cache, tables = _paged(list(lens), dtype, seed, **paged)
    q = torch.randn(sum(query_lens), HKV * group, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return q, ks, vs, k_cache, v_cache, tables, lens, query_lens


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group", [1, 2, 3], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("sliding_window", [None, 5], ids=["full", "window5"])
@pytest.mark.parametrize("batch", BATCHES)
def test_matches_dense_reference(batch, sliding_window, group, dtype, atol, rtol):
    """Decodes, chunked and fresh prefills with ragged lengths around block edges, one call per batch."""
    q, ks, vs, k_cache, v_cache, tables, lens, query_lens = _case(batch, group, dtype)

    got = paged_attention_ref(q, k_cache, v_cache, tables, lens, query_lens, sliding_window)

    expected = dense_attention_ref(q, ks, vs, query_lens, sliding_window).to(dtype)
    assert got.shape == q.shape and got.dtype == dtype
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)


def test_window_and_causality_change_the_output():
    """Guards the dense reference: dropping the window or the causal mask must move outputs past tolerance."""
    q, ks, vs, k_cache, v_cache, tables, lens, query_lens = _case("mixed", 2, torch.float32)

    windowed = paged_attention_ref(q, k_cache, v_cache, tables, lens, query_lens, 5)
    full = paged_attention_ref(q, k_cache, v_cache, tables, lens, query_lens)

    assert (windowed - full).abs().max() > 0.1
    assert (full - dense_attention_ref(q, ks, vs, query_lens, None, causal=False).float()).abs().max() > 0.1


def test_non_contiguous_query():
    """q as a strided slice of a fused qkv projection gives the same output as its contiguous copy."""
    q, ks, vs, k_cache, v_cache, tables, lens, query_lens = _case("mixed", 2, torch.float32)
    qkv = torch.cat([q, torch.randn_like(q), torch.randn_like(q)], 1)
    strided = qkv[:, : q.shape[1]]
    assert not strided.is_contiguous()

    got = paged_attention_ref(strided, k_cache, v_cache, tables, lens, query_lens)

    torch.testing.assert_close(got, dense_attention_ref(q, ks, vs, query_lens, None).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS)
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), 3.0e4], ids=["nan", "inf", "huge"])
@pytest.mark.parametrize("batch", ["decodes", "mixed", "prefills"])
def test_unused_slots_never_leak(batch, garbage, dtype):
    """Spare blocks (block 0, the tables' padding, among them) and slots past each context hold garbage: outputs
    must equal the clean dense reference, as a cache that freed blocks without zeroing them needs."""
    q, ks, vs, k_cache, v_cache, tables, lens, query_lens = _case(batch, 2, dtype, garbage=garbage,
                                                                   zero_block_used=False)

    got = paged_attention_ref(q, k_cache, v_cache, tables, lens, query_lens)

    atol, rtol = next((a, r) for d, a, r in TOLERANCES if d == dtype)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, dense_attention_ref(q, ks, vs, query_lens, None).to(dtype), atol=atol, rtol=rtol)
