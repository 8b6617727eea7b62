"""Attention over a LoRC latent cache: the reference against a hand-written float64 computation,
the Triton decode kernel against the reference, and the dispatch."""

import pytest
import torch

import kernels
from conftest import shuffled_paged_pools
from engine.model.rope import apply_rope
from kernels.latent_attention import latent_attention_ref, latent_decode_triton, rebuild_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 2e-2, 2e-2)]
LENGTHS = (1, 15, 16, 17, 63, 65, 130)  # ragged: inside, at and across block and BLOCK_N edges
# (Hq, Hkv, D, r_k, r_v, biases): ranks that are not powers of two, padded and masked in the kernel
SHAPES = [(9, 3, 64, 37, 90, True), (4, 4, 32, 37, 90, False), (16, 2, 64, 90, 37, True),
          (32, 8, 128, 200, 200, False)]
SHAPE_IDS = ["smollm2-gqa3-bias", "mha", "gqa8-bias", "llama3-8b"]


def _inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim)  # (D/2,) fp32


def _latent_inputs(lengths, num_heads, num_kv_heads, head_dim, rank_k, rank_v, biases, dtype, block_size=16):
    """Latent caches whose blocks are shuffled across sequences; unused blocks and slots past the context hold NaN.

    Returns q [B, Hq, D], ck_cache, cv_cache, (k_up, v_up, k_bias, v_bias, inv_freq), block tables.
    A_k, A_v are scaled by 1/sqrt(r) so rebuilt keys and values are O(1), as in a real layer.
    """
    (ck_cache, cv_cache), tables = shuffled_paged_pools(lengths, [(rank_k,), (rank_v,)], DEVICE, block_size)
    width = num_kv_heads * head_dim
    k_up = torch.randn(width, rank_k, device=DEVICE) / rank_k**0.5
    v_up = torch.randn(width, rank_v, device=DEVICE) / rank_v**0.5
    k_bias, v_bias = (torch.randn(width, device=DEVICE), torch.randn(width, device=DEVICE)) if biases else (None, None)
    q = torch.randn(len(lengths), num_heads, head_dim, device=DEVICE)
    weights = tuple(None if t is None else t.to(dtype) for t in (k_up, v_up, k_bias, v_bias)) + (_inv_freq(head_dim),)
    return q.to(dtype), ck_cache.to(dtype), cv_cache.to(dtype), weights, tables


def _double(weights):
    """The weights in float64 for the reference; inv_freq stays fp32 (RoPE's frequencies are fp32 by definition)."""
    return tuple(None if t is None else t.double() for t in weights[:4]) + weights[4:]


# -- an independent float64 computation: full K/V through the table, RoPE from its formula, attention by hand --
def _rope(x, positions, inv_freq):
    """x [T, H, D] float64; k1' = k1·cos - k2·sin, k2' = k2·cos + k1·sin with freqs = p·inv_freq in fp32."""
    freqs = (positions.float()[:, None] * inv_freq[None, :]).double()[:, None, :]  # (T, 1, D/2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * freqs.cos() - x2 * freqs.sin(), x2 * freqs.cos() + x1 * freqs.sin()), dim=-1)


def _full_kv(ck, cv, weights, num_kv_heads, positions):
    """Latents [T, r] -> k (rotated), v [T, Hkv, D] in float64, with plain matmuls."""
    k_up, v_up, k_bias, v_bias, inv_freq = weights
    k = ck.double() @ k_up.double().T + (0 if k_bias is None else k_bias.double())
    v = cv.double() @ v_up.double().T + (0 if v_bias is None else v_bias.double())
    return _rope(k.view(len(ck), num_kv_heads, -1), positions, inv_freq), v.view(len(cv), num_kv_heads, -1)


def _attention_by_hand(q, ck_cache, cv_cache, weights, tables, context_lens, query_lens, window):
    """Each sequence's K/V read slot by slot through its table, then masked softmax with GQA: [T, Hq, D] float64."""
    num_kv_heads = weights[0].shape[0] // q.shape[-1]
    block_size = ck_cache.shape[1]
    outs, start = [], 0
    for i, (length, n) in enumerate(zip(context_lens, query_lens)):
        pos = torch.arange(length, device=q.device)
        blocks = tables[i].long()[pos // block_size]
        k, v = _full_kv(ck_cache[blocks, pos % block_size], cv_cache[blocks, pos % block_size], weights, num_kv_heads,
                        pos)
        group = q.shape[1] // num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (L, Hq, D)
        query_pos = pos[length - n:]
        scores = torch.einsum("nhd,lhd->hnl", q[start:start + n].double(), k) / q.shape[-1] ** 0.5
        visible = pos[None, :] <= query_pos[:, None]
        if window is not None:
            visible &= query_pos[:, None] - pos[None, :] < window
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hnl,lhd->nhd", probs, v))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("biases", [False, True])
def test_rebuild_kv_matches_the_formula(biases):
    *_, weights, _ = _latent_inputs((1,), 6, 2, 64, 37, 90, biases, torch.float64)
    positions = torch.tensor([0, 1, 5, 17, 130, 4099], device=DEVICE)
    ck, cv = torch.randn(2, 6, 37, device=DEVICE).double(), torch.randn(2, 6, 90, device=DEVICE).double()
    k_up, v_up, k_bias, v_bias, inv_freq = weights
    k, v = rebuild_kv(ck, cv, k_up, v_up, k_bias, v_bias, positions, inv_freq, 2)  # positions broadcast over dim 0
    assert k.shape == v.shape == (2, 6, 2, 64)
    for b in range(2):
        k_ref, v_ref = _full_kv(ck[b], cv[b], weights, 2, positions)
        torch.testing.assert_close(k[b], k_ref, atol=1e-6, rtol=1e-6)  # cos/sin are fp32 in rebuild_kv
        torch.testing.assert_close(v[b], v_ref, atol=1e-12, rtol=1e-12)


def test_rebuild_kv_rounds_like_the_dense_path():
    """In fp16, rebuilt keys equal the engine's dense path bit for bit: bias, then apply_rope with fp16 cos/sin."""
    *_, (k_up, v_up, k_bias, v_bias, inv_freq), _ = _latent_inputs((1,), 6, 2, 64, 37, 90, True, torch.float16)
    positions = torch.arange(40, device=DEVICE)
    ck, cv = torch.randn(40, 37, device=DEVICE).half(), torch.randn(40, 90, device=DEVICE).half()
    k, _ = rebuild_kv(ck, cv, k_up, v_up, k_bias, v_bias, positions, inv_freq, 2)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    dense = apply_rope(torch.nn.functional.linear(ck, k_up, k_bias).view(40, 2, 64), emb.cos().half(), emb.sin().half())
    assert torch.equal(k, dense)


@pytest.mark.parametrize("query_lens", [(1, 1, 1, 1), (1, 4, 1, 7)], ids=["decode", "chunks"])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("biases", [False, True])
def test_reference_matches_attention_by_hand(query_lens, window, biases):
    context_lens = (17, 40, 1, 33)
    q, ck_cache, cv_cache, weights, tables = _latent_inputs(context_lens, 6, 2, 32, 37, 20, biases, torch.float64)
    tables[1, 0] = tables[0, 0]  # a prefix hit: sequence 1 reads sequence 0's (full) first block
    q = torch.randn(sum(query_lens), 6, 32, device=DEVICE).double()
    out = latent_attention_ref(q, ck_cache, cv_cache, *weights, tables, context_lens, query_lens, window)
    expected = _attention_by_hand(q, ck_cache, cv_cache, weights, tables, context_lens, query_lens, window)
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)  # cos/sin are fp32 in the reference


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, rank_k, rank_v, biases", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("window", [None, 5])
def test_kernel_matches_reference(dtype, atol, rtol, num_heads, num_kv_heads, head_dim, rank_k, rank_v, biases,
                                  window):
    q, ck_cache, cv_cache, weights, tables = _latent_inputs(LENGTHS, num_heads, num_kv_heads, head_dim, rank_k,
                                                            rank_v, biases, dtype)
    lens = torch.tensor(LENGTHS, dtype=torch.int32, device=DEVICE)
    out = latent_decode_triton(q, ck_cache, cv_cache, *weights, tables, lens, window)
    ref = latent_attention_ref(q.double(), ck_cache.double(), cv_cache.double(), *_double(weights), tables, LENGTHS,
                               (1,) * len(LENGTHS), window)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref.to(dtype), atol=atol, rtol=rtol)


@pytest.mark.slow
def test_long_context():
    lengths = (4099, 1, 2048)
    q, ck_cache, cv_cache, weights, tables = _latent_inputs(lengths, 32, 8, 128, 300, 520, True, torch.float16)
    out = latent_decode_triton(q, ck_cache, cv_cache, *weights, tables,
                               torch.tensor(lengths, dtype=torch.int32, device=DEVICE))
    ref = latent_attention_ref(q.double(), ck_cache.double(), cv_cache.double(), *_double(weights), tables, lengths,
                               (1, 1, 1))
    torch.testing.assert_close(out, ref.half(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, change", [
    (4, 2, 24, None),  # head_dim not a power of two
    (4, 2, 16, None),  # halves of 8: below tl.dot's 16
    (5, 2, 32, None),  # query heads not a whole number of groups
    (4, 2, 32, "k_up"),  # k_up's rank differs from the cache's
    (4, 2, 32, "bias"),  # a bias of the wrong length
    (4, 2, 32, "inv_freq"),  # inv_freq not fp32
], ids=["head-dim-24", "head-dim-16", "partial-group", "k-up-rank", "bias-length", "inv-freq-dtype"])
def test_bad_inputs_are_refused(num_heads, num_kv_heads, head_dim, change):
    q, ck_cache, cv_cache, (k_up, v_up, k_bias, v_bias, inv_freq), tables = _latent_inputs(
        (5,), num_heads, num_kv_heads, head_dim, 12, 20, True, torch.float32)
    if change == "k_up":
        k_up = k_up[:, :11]
    elif change == "bias":
        k_bias = k_bias[:-1]
    elif change == "inv_freq":
        inv_freq = inv_freq.double()
    with pytest.raises(ValueError, match=rf"got q \({len(q)}, {num_heads}, {head_dim}\), ck_cache"):
        latent_decode_triton(q, ck_cache, cv_cache, k_up, v_up, k_bias, v_bias, inv_freq, tables,
                             torch.tensor([5], dtype=torch.int32, device=DEVICE))


def test_mixed_dtypes_are_refused():
    q, ck_cache, cv_cache, weights, tables = _latent_inputs((5,), 4, 2, 32, 12, 20, False, torch.float32)
    with pytest.raises(ValueError, match="one dtype"):
        latent_decode_triton(q.half(), ck_cache, cv_cache, *weights, tables,
                             torch.tensor([5], dtype=torch.int32, device=DEVICE))


def test_dispatch_sends_decode_steps_to_the_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "latent_decode_triton", lambda *a: calls.append(a) or torch.zeros(1))
    q, ck_cache, cv_cache, weights, tables = _latent_inputs((3, 20), 4, 2, 32, 12, 20, False, torch.float32)
    assert kernels.latent_decode_kernel_applies(q, ck_cache, (1, 1))
    kernels.latent_attention(q, ck_cache, cv_cache, *weights, tables, (3, 20), (1, 1))
    assert len(calls) == 1
    chunk_q = torch.randn(4, 4, 32, device=DEVICE)
    kernels.latent_attention(chunk_q, ck_cache, cv_cache, *weights, tables, (3, 20), (1, 3))  # a chunk: the reference
    assert len(calls) == 1
    monkeypatch.setattr(kernels, "BACKEND", "torch")
    assert not kernels.latent_decode_kernel_applies(q, ck_cache, (1, 1))


def test_dispatch_runs_the_kernel_from_device_lengths():
    q, ck_cache, cv_cache, weights, tables = _latent_inputs((3, 20), 4, 2, 32, 12, 20, True, torch.float32)
    lens = torch.tensor([3, 20], dtype=torch.int32, device=DEVICE)
    out = kernels.latent_attention(q, ck_cache, cv_cache, *weights, tables, None, (1, 1), context_lens_tensor=lens)
    ref = latent_attention_ref(q, ck_cache, cv_cache, *weights, tables, (3, 20), (1, 1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
