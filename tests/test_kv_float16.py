"""The float16 KV cache (`kv_cache_dtype="float16"`): the native conversions bit for bit against
torch's, every reader (torch reference, native, Triton under the interpreter) against float64
attention over the float16 values, the native writer against the torch one, and the engine
against the reference decoding of a model that attends to float16-rounded K/V.

Stale slots (unused blocks, past each context) hold NaN, so a reader that touches one shows NaN.
"""

import os

import pytest
import torch

from conftest import dense_attention_ref, save_tiny_model, shuffled_paged_pools
from engine.core.kv_cache import bytes_per_block
from engine.model.loader import load_model
from kernels.paged_attention import paged_attention_ref, paged_decode_triton
from test_kv_int8 import (check_engine_equals_the_reference_decoding, native_decode_cases, native_off,
                          no_compiler)


def check_native_conversions():
    """Every float16 widened, and floats of every magnitude (ties, subnormals, overflow) rounded, as torch does."""
    from kernels.cpu.elementwise import float16_from_native, float32_from_native

    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    got, want = float32_from_native(every), every.float()
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32))  # -0.0 and inf included
    values = want[finite].double().sort().values
    ties = ((values[:-1] + values[1:]) / 2).float()  # halfway between neighbours: to even
    x = torch.cat([torch.randn(1 << 16) * torch.logspace(-10, 6, 1 << 16), values.float(), ties,
                   torch.tensor([65504.0, 65519.99, 65520.0, 1e9, float("inf"), -float("inf"), 0.0, -0.0, 1e-30])])
    assert torch.equal(float16_from_native(x).view(torch.int16), x.to(torch.float16).view(torch.int16))
    nan = float16_from_native(torch.tensor([float("nan")]))
    assert nan.isnan().all()


def float16_case(lengths, group, head_dim, block_size, hkv=2, seed=0):
    """Queries, float16 K/V pools (NaN in stale slots), tables, and each sequence's keys and values."""
    torch.manual_seed(seed)
    pools, tables = shuffled_paged_pools(lengths, [(hkv, head_dim)] * 2, "cpu", block_size)
    k, v = (pool.mul(3).to(torch.float16) for pool in pools)
    q = torch.randn(len(lengths), hkv * group, head_dim)
    keys = [k[tables[i].long()].flatten(0, 1)[:n].double() for i, n in enumerate(lengths)]
    values = [v[tables[i].long()].flatten(0, 1)[:n].double() for i, n in enumerate(lengths)]
    return q, (k, v), tables, keys, values


def check_native_float16_decode(lengths, group, head_dim, block_size, window):
    from kernels.cpu.attention import native_decode_applies, native_paged_decode

    q, (k, v), tables, keys, values = float16_case(lengths, group, head_dim, block_size)
    assert native_decode_applies(q, k, v) and not native_decode_applies(q, k, v.float())
    got = native_paged_decode(q, k, v, tables, torch.tensor(lengths), window)
    want = dense_attention_ref(q, keys, values, (1,) * len(lengths), window)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@no_compiler
@native_off
def test_native_conversions_round_as_torch_does():
    check_native_conversions()


@pytest.mark.parametrize("lengths", [[1], [31, 32, 33, 65], [1, 17, 100, 3, 250]], ids=["one", "chunks", "ragged"])
@pytest.mark.parametrize("window", [None, 7])
def test_reference_reads_the_float16_cache(lengths, window):
    q, (k, v), tables, keys, values = float16_case(lengths, 3, 64, 16)
    got = paged_attention_ref(q, k, v, tables, tuple(lengths), (1,) * len(lengths), window)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), dense_attention_ref(q, keys, values, (1,) * len(lengths), window),
                               atol=2e-5, rtol=2e-5)


TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.skipif(TRITON_DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernels need a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode_reads_the_float16_cache(dtype):
    """Under the interpreter here; compiled on a GPU (bench/gpu.sh runs this test there)."""
    lengths = [1, 70, 33]
    q, (k, v), tables, keys, values = float16_case(lengths, 3, 32, 16)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)  # the kernel loads masked slots as 0: NaN is for the CPU readers
    on = lambda t: t.to(TRITON_DEVICE)  # noqa: E731
    got = paged_decode_triton(on(q.to(dtype)), on(k), on(v), on(tables), on(torch.tensor(lengths, dtype=torch.int32)))
    assert got.dtype == dtype
    want = dense_attention_ref(q.to(dtype), keys, values, (1,) * len(lengths), None)
    torch.testing.assert_close(got.double().cpu(), want, **TRITON_TOL[dtype])


@native_decode_cases
def test_native_decode_reads_the_float16_cache(lengths, block_size, group, head_dim, window):
    check_native_float16_decode(lengths, group, head_dim, block_size, window)


@pytest.mark.parametrize("rank_fraction", [None, 0.4], ids=["dense", "factorised"])
@no_compiler
@native_off
def test_native_decoder_layer_writes_what_the_torch_writer_writes(rank_fraction, tmp_path):
    from test_cpu_decoder import _decode_batch, _model, _run_both

    model = _model("qwen2-bias", tmp_path, rank_fraction)
    model.use_kv_cache_dtype("float16")
    ids, positions, ctx, float_pools = _decode_batch(model, [7, 1, 33, 16, 17], 4)
    pools = [pool.to(torch.float16) for pool in float_pools]
    for layer, k, v in zip(model.model.layers, pools[0::2], pools[1::2]):
        layer.self_attn.kv_cache = (k, v)
    (got, got_pools), (want, want_pools) = _run_both(model, ids, positions, ctx, pools)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    for g, w in zip(got_pools, want_pools):  # the same float16 bits, up to a tie broken the other way by float noise
        assert g.dtype == torch.float16
        torch.testing.assert_close(g.float(), w.float(), atol=1e-7, rtol=1e-3, equal_nan=True)


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window"])
def test_engine_with_a_float16_cache_equals_the_reference_decoding(name, tmp_path, cpu_kernels):
    check_engine_equals_the_reference_decoding(name, "float16", torch.float16, tmp_path)


def test_float16_cache_bytes_and_bad_settings(tmp_path):
    from test_cpu_decoder import CONFIGS

    save_tiny_model(CONFIGS["llama-gqa"], tmp_path)
    model = load_model(tmp_path, dtype=torch.float32, device="cpu")
    attn = model.model.layers[0].self_attn
    values = len(model.model.layers) * 2 * attn.num_kv_heads * attn.head_dim  # per token
    assert bytes_per_block(model, 16) == 16 * values * 4
    model.use_kv_cache_dtype("float16")
    assert bytes_per_block(model, 16) == 16 * values * 2
    model.use_kv_cache_dtype("auto")
    assert bytes_per_block(model, 16) == 16 * values * 4
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of 'auto', 'float16', 'int8', got 'half'"):
        attn.use_kv_cache_dtype("half")
    attn.inv_freq = model.model.rotary.inv_freq  # as a LoRC folder's layers are
    with pytest.raises(ValueError, match="float16 KV cache takes keys and values, not LoRC latents"):
        attn.use_kv_cache_dtype("float16")
