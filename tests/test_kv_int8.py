"""The int8 KV cache (kernels.kv_quant): the format's bounds, every reader (torch reference, native,
Triton under the interpreter) against float64 attention over the dequantised cache, the native
writer against the torch one, and the engine against the reference decoding of the same model.

Stale slots (unused blocks, past each context) keep random levels and a NaN scale, so a reader
that touches one shows NaN.
"""

import json
import os
import shutil

import pytest
import torch

from conftest import dense_attention_ref, save_tiny_model, save_tiny_tokenizer, shuffled_paged_pools
from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.core.kv_cache import bytes_per_block
from engine.eval.reference_decoding import stream_tokens
from engine.model.loader import load_model
from kernels.cpu import build as cpu_native
from kernels.kv_quant import dequantize_vectors, quantize_vectors
from kernels.paged_attention import paged_attention_ref, paged_decode_triton

no_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler")
native_off = pytest.mark.skipif(os.environ.get(cpu_native.DISABLE_ENV) == "0",
                                reason=f"{cpu_native.DISABLE_ENV}=0 turns the native kernels off")


def int8_pools(pools: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Float pools with NaN in their stale slots -> (levels, scales) each, the stale scales NaN."""
    out = []
    for pool in pools:
        stale = pool.isnan().any(-1)
        levels, scales = quantize_vectors(pool.nan_to_num(0.0) * 3)
        levels[stale] = torch.randint(-127, 128, levels[stale].shape, dtype=torch.int8)
        scales[stale] = float("nan")
        out.append((levels, scales))
    return out


def int8_case(lengths, group, head_dim, block_size, hkv=2, seed=0):
    """Queries, int8 K/V pools with their scales, tables, and the dequantised keys and values per sequence."""
    torch.manual_seed(seed)
    pools, tables = shuffled_paged_pools(lengths, [(hkv, head_dim)] * 2, "cpu", block_size)
    (k, ks), (v, vs) = int8_pools(pools)
    q = torch.randn(len(lengths), hkv * group, head_dim)
    keys, values = [], []
    for i, n in enumerate(lengths):
        blocks = tables[i].long()
        keys.append(dequantize_vectors(k[blocks].flatten(0, 1)[:n], ks[blocks].flatten(0, 1)[:n], torch.float64))
        values.append(dequantize_vectors(v[blocks].flatten(0, 1)[:n], vs[blocks].flatten(0, 1)[:n], torch.float64))
    return q, (k, v), (ks, vs), tables, keys, values


def check_native_int8_decode(lengths, group, head_dim, block_size, window):
    from kernels.cpu.attention import native_decode_applies, native_paged_decode

    q, (k, v), scales, tables, keys, values = int8_case(lengths, group, head_dim, block_size)
    assert native_decode_applies(q, k, v, scales) and not native_decode_applies(q, k, v)
    got = native_paged_decode(q, k, v, tables, torch.tensor(lengths), window, scales)
    want = dense_attention_ref(q, keys, values, (1,) * len(lengths), window)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_the_format_rounds_each_vector_to_its_own_scale():
    x = torch.randn(50, 3, 64) * torch.logspace(-6, 4, 50)[:, None, None]
    x[7, 1] = 0.0  # an all-zero vector: scale 0, levels 0
    levels, scales = quantize_vectors(x)
    assert levels.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (50, 3)
    assert levels.abs().max() == 127 and (levels.abs().amax(-1)[scales > 0] == 127).all()  # the largest maps to ±127
    assert (levels[7, 1] == 0).all() and scales[7, 1] == 0
    err = (dequantize_vectors(levels, scales, torch.float64) - x.double()).abs()
    assert (err <= scales.double().unsqueeze(-1) * (0.5 + 1e-6)).all()  # round to nearest: within half a step
    assert dequantize_vectors(levels, scales, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("lengths", [[1], [31, 32, 33, 65], [1, 17, 100, 3, 250]], ids=["one", "chunks", "ragged"])
@pytest.mark.parametrize("window", [None, 7])
def test_reference_reads_the_int8_cache(lengths, window):
    q, (k, v), scales, tables, keys, values = int8_case(lengths, 3, 64, 16)
    got = paged_attention_ref(q, k, v, tables, tuple(lengths), (1,) * len(lengths), window, scales)
    torch.testing.assert_close(got.double(), dense_attention_ref(q, keys, values, (1,) * len(lengths), window),
                               atol=2e-5, rtol=2e-5)


def test_reference_reads_the_int8_cache_for_prefill_chunks():
    lengths, query_lens = [40, 9], (6, 9)
    q, (k, v), scales, tables, keys, values = int8_case(lengths, 2, 32, 4)
    q = torch.randn(sum(query_lens), q.shape[1], 32)
    got = paged_attention_ref(q, k, v, tables, tuple(lengths), query_lens, None, scales)
    torch.testing.assert_close(got.double(), dense_attention_ref(q, keys, values, query_lens, None),
                               atol=2e-5, rtol=2e-5)


TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
              torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.skipif(TRITON_DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernels need a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 40])
def test_triton_decode_reads_the_int8_cache(window, dtype):
    """Under the interpreter here; compiled on a GPU (bench/gpu.sh runs this test there)."""
    lengths = [1, 70, 33]
    q, (k, v), scales, tables, keys, values = int8_case(lengths, 3, 32, 16)
    for pool in scales:  # the kernel loads masked slots as 0: NaN scales are for the CPU readers' strays
        pool.nan_to_num_(0.0)
    on = lambda t: t.to(TRITON_DEVICE)  # noqa: E731
    got = paged_decode_triton(on(q.to(dtype)), on(k), on(v), on(tables),
                              on(torch.tensor(lengths, dtype=torch.int32)), window, tuple(map(on, scales)))
    assert got.dtype == dtype
    want = dense_attention_ref(q.to(dtype), keys, values, (1,) * len(lengths), window)
    torch.testing.assert_close(got.double().cpu(), want, **TRITON_TOL[dtype])


# enough sequences that a unit of the native kernel's work takes all of a sequence's KV heads at
# once (attention.c's heads_per_unit), where fewer take one head each
MANY_SEQUENCES = [1 + 13 * i % 97 for i in range(40)]


def native_decode_cases(test):
    """The lengths, block sizes, head shapes and windows every native cache reader is held to (and
    the markers that skip it where the kernels are not built)."""
    for mark in (pytest.mark.parametrize("lengths,block_size", [([1], 16), ([31, 32, 33, 64, 65], 16),
                                                                ([1, 17, 100, 3], 5),
                                                                (MANY_SEQUENCES, 16)]),
                 pytest.mark.parametrize("group,head_dim", [(1, 16), (3, 64), (8, 128)]),
                 pytest.mark.parametrize("window", [None, 40]), no_compiler, native_off):
        test = mark(test)
    return test


@native_decode_cases
def test_native_decode_reads_the_int8_cache(lengths, block_size, group, head_dim, window):
    check_native_int8_decode(lengths, group, head_dim, block_size, window)


@pytest.mark.parametrize("rank_fraction", [None, 0.4], ids=["dense", "factorised"])
@no_compiler
@native_off
def test_native_decoder_layer_writes_what_the_torch_writer_writes(rank_fraction, tmp_path):
    from test_cpu_decoder import _decode_batch, _model, _run_both

    model = _model("qwen2-bias", tmp_path, rank_fraction)
    model.use_kv_cache_dtype("int8")
    ids, positions, ctx, float_pools = _decode_batch(model, [7, 1, 33, 16, 17], 4)
    pools = []
    for layer, k_v in zip(model.model.layers, zip(float_pools[0::2], float_pools[1::2])):
        (k, ks), (v, vs) = int8_pools(list(k_v))
        layer.self_attn.kv_cache, layer.self_attn.kv_scales = (k, v), (ks, vs)
        pools += [k, v, ks, vs]
    (got, got_pools), (want, want_pools) = _run_both(model, ids, positions, ctx, pools)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    for i, (g, w) in enumerate(zip(got_pools, want_pools)):
        if g.dtype == torch.int8:  # levels: equal, up to a tie broken the other way by float noise
            assert (g.int() - w.int()).abs().max() <= 1 and (g != w).float().mean() < 1e-3
        else:
            torch.testing.assert_close(g, w, atol=1e-7, rtol=1e-6, equal_nan=True)


def check_engine_equals_the_reference_decoding(name, kv_cache_dtype, dtype, tmp_path):
    """The engine over a `kv_cache_dtype` cache decodes what a cache-free forward attending to the
    same rounded K/V decodes, its prompts prefilled in chunks over the cache."""
    from test_cpu_decoder import CONFIGS, VOCAB

    save_tiny_model(CONFIGS[name], tmp_path)
    save_tiny_tokenizer(tmp_path, VOCAB)
    reference = load_model(tmp_path, dtype=torch.float32, device="cpu")
    reference.use_kv_cache_dtype(kv_cache_dtype)
    llm = LLM(tmp_path, dtype="float32", device="cpu", kv_cache_memory=1 << 20, max_model_len=128,
              kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=32)  # 32: prompts prefill in chunks
    assert llm.runner.kv_cache[0][0].dtype == dtype
    prompts = [torch.randint(2, VOCAB, (n,)).tolist() for n in (3, 17, 40)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == list(stream_tokens(reference, prompt, 12))


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window"])
def test_engine_with_an_int8_cache_equals_the_reference_decoding(name, tmp_path, cpu_kernels):
    check_engine_equals_the_reference_decoding(name, "int8", torch.int8, tmp_path)


def test_int8_cache_bytes_and_bad_settings(tmp_path):
    from test_cpu_decoder import CONFIGS

    save_tiny_model(CONFIGS["llama-gqa"], tmp_path)
    model = load_model(tmp_path, dtype=torch.float32, device="cpu")
    attn = model.model.layers[0].self_attn
    vectors = len(model.model.layers) * 2 * attn.num_kv_heads  # per token
    assert bytes_per_block(model, 16) == 16 * vectors * attn.head_dim * 4
    model.use_kv_cache_dtype("int8")
    assert bytes_per_block(model, 16) == 16 * vectors * (attn.head_dim + 4)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of 'auto', 'float16', 'int8', got 'fp8'"):
        EngineConfig(kv_cache_dtype="fp8")
    model.model.layers[0].self_attn.inv_freq = model.model.rotary.inv_freq  # as a LoRC folder's layers are
    with pytest.raises(ValueError, match="int8 KV cache takes keys and values, not LoRC latents"):
        model.model.layers[0].self_attn.use_kv_cache_dtype("int8")


def test_eval_scores_the_int8_cache(tmp_path, capsys, cpu_kernels):
    from converters.cli import main
    from test_cpu_decoder import CONFIGS, VOCAB

    save_tiny_model(CONFIGS["llama-gqa"], tmp_path)
    save_tiny_tokenizer(tmp_path, VOCAB)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{i % VOCAB}" for i in torch.randint(0, VOCAB, (300,)).tolist()))
    results = {}
    for kv in ("auto", "int8"):
        assert main(["eval", str(tmp_path), "--text", str(text), "--ctx", "64", "--kv-cache-dtype", kv,
                     "--json", str(tmp_path / f"{kv}.json")]) == 0
        results[kv] = json.loads((tmp_path / f"{kv}.json").read_text())
    assert results["int8"]["kv_cache_dtype"] == "int8"
    assert results["int8"]["perplexity"] != results["auto"]["perplexity"]  # the rounding is in the pass
    assert abs(results["int8"]["perplexity"] / results["auto"]["perplexity"] - 1) < 0.01
