"""A decoder layer's decode step as one native call (engine.model.cpu_serving.NativeDecoderLayer over
kernels.cpu.decoder_layer) against the same layers
run operation by operation (whose logits equal transformers', tests/test_model.py).

The past K/V sit in blocks shuffled through the pool with NaN in every slot no sequence owns, so a
stray read shows; both paths start from the same cache and must leave the same cache behind.
"""

import os
import shutil

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from conftest import save_tiny_model, save_tiny_tokenizer, shuffled_paged_pools
from engine import LLM, SamplingParams, load_model
from engine.model.attention import AttentionContext
from engine.model.cpu_serving import NativeDecoderLayer, PackedLowRankLinear, to_cpu_serving
from engine.model.layers import LowRankLinear
from engine.model.llama import DecoderLayer
from kernels.cpu import build as cpu_native

pytestmark = [pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler"),
              pytest.mark.skipif(os.environ.get(cpu_native.DISABLE_ENV) == "0",
                                 reason=f"{cpu_native.DISABLE_ENV}=0 turns the native kernels off")]

VOCAB = 101
CONFIGS = {  # head sizes 16 / 32 / 64, GQA groups 2 / 4 / 1, biases, a sliding window
    "llama-gqa": LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-bias": Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=200, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False),
    "mistral-window": MistralConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=160, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=2, head_dim=64, sliding_window=5,
                                    tie_word_embeddings=False),
}
FACTORISED = ("q_proj", "v_proj", "gate_proj", "down_proj")  # the others stay dense: both kinds in one layer


def _factorise(model, rank_fraction: float) -> None:
    """Swap some projections for their truncated SVD (a `LowRankLinear`, as a compressed folder loads)."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in FACTORISED:
                dense = getattr(parent, name, None)
                if dense is None:
                    continue
                rank = max(1, int(rank_fraction * min(dense.weight.shape)))
                u, s, vh = torch.linalg.svd(dense.weight, full_matrices=False)
                low = LowRankLinear(dense.in_features, dense.out_features, rank, dense.bias is not None)
                low.A.data, low.B.data = u[:, :rank] * s[:rank], vh[:rank].contiguous()
                if dense.bias is not None:
                    low.bias.data = dense.bias.data
                setattr(parent, name, low)


def _model(name, tmp_path, rank_fraction=None):
    save_tiny_model(CONFIGS[name], tmp_path)
    model = load_model(tmp_path, dtype=torch.float32, device="cpu")
    if rank_fraction is not None:
        _factorise(model, rank_fraction)
    assert to_cpu_serving(model)
    return model


def _per_operation(layer: NativeDecoderLayer) -> DecoderLayer:
    """The same layer (same modules, same cache) as a plain `DecoderLayer`: every step operation by operation."""
    plain = DecoderLayer.__new__(DecoderLayer)
    plain.__dict__.update(layer.__dict__)
    return plain


def _natives(model) -> list:
    return [layer if isinstance(layer, NativeDecoderLayer) else None for layer in model.model.layers]


def _set_layers(model, layers) -> None:
    for i, layer in enumerate(layers):
        model.model.layers[i] = layer


def _decode_batch(model, lengths, block_size):
    """Shuffled cache pools for every layer and one new token per sequence at position length - 1."""
    attn = model.model.layers[0].self_attn
    shape = (attn.num_kv_heads, attn.head_dim)
    pools, tables = shuffled_paged_pools(lengths, [shape] * (2 * len(model.model.layers)), "cpu", block_size)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.kv_cache = (pools[2 * i], pools[2 * i + 1])
    positions = torch.tensor([n - 1 for n in lengths])
    slots = torch.tensor([int(tables[i, p // block_size]) * block_size + p % block_size
                          for i, p in enumerate(positions.tolist())])
    base = AttentionContext.from_lengths([1] * len(lengths), "cpu")
    ctx = AttentionContext(cu_seqlens=base.cu_seqlens, seqlens=base.seqlens, max_seqlen=1, slot_mapping=slots,
                           block_tables=tables, context_lens=tuple(lengths), reads_cache=True,
                           context_lens_tensor=torch.tensor(lengths, dtype=torch.int32))
    return torch.randint(0, VOCAB, (len(lengths),)), positions, ctx, pools


def _run_both(model, ids, positions, ctx, pools):
    """Hidden states and caches after one step natively and operation by operation, from the same cache."""
    natives = _natives(model)
    assert all(n is not None for n in natives)
    start = [p.clone() for p in pools]
    with torch.inference_mode():
        native = model(ids, positions, ctx), [p.clone() for p in pools]
        for pool, saved in zip(pools, start):
            pool.copy_(saved)
        _set_layers(model, [_per_operation(n) for n in natives])
        per_op = model(ids, positions, ctx), [p.clone() for p in pools]
    _set_layers(model, natives)
    return native, per_op


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("rank_fraction", [None, 0.4], ids=["dense", "factorised"])
@pytest.mark.parametrize("lengths,block_size", [([1], 16), ([7, 1, 33, 16, 17], 4), ([40, 2, 9], 1)],
                         ids=["one", "ragged-4", "ragged-1"])
def test_native_decode_step_matches_the_per_operation_path(name, rank_fraction, lengths, block_size, tmp_path):
    model = _model(name, tmp_path, rank_fraction)
    assert isinstance(model.model.layers[0].mlp.gate_proj, PackedLowRankLinear) == (rank_fraction is not None)
    (got, got_caches), (want, want_caches) = _run_both(model, *_decode_batch(model, lengths, block_size))
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    for got_cache, want_cache in zip(got_caches, want_caches):  # the new K/V land in the same slots; NaN stays NaN
        torch.testing.assert_close(got_cache, want_cache, atol=2e-5, rtol=2e-5, equal_nan=True)


def test_many_rows_and_threads_agree(tmp_path):
    """64 sequences: the projections' row tiles and the attention pairs split across threads."""
    model = _model("qwen2-bias", tmp_path, 0.5)
    lengths = torch.randint(1, 50, (64,), generator=torch.Generator().manual_seed(5)).tolist()
    (got, _), (want, _) = _run_both(model, *_decode_batch(model, lengths, 16))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_prefill_and_mixed_steps_keep_the_per_operation_path(tmp_path):
    model = _model("llama-gqa", tmp_path)
    x = torch.randn(3, 64)
    ctx = AttentionContext.from_lengths([3], "cpu")  # a cache-free prefill
    assert not NativeDecoderLayer.applies(x, ctx)
    *_, decode_ctx, _ = _decode_batch(model, [4, 5], 16)
    assert NativeDecoderLayer.applies(torch.randn(2, 64), decode_ctx)
    assert not NativeDecoderLayer.applies(torch.randn(2, 64, dtype=torch.float64), decode_ctx)


def test_layers_the_kernel_cannot_take_are_left_to_the_per_operation_path(tmp_path):
    odd = LlamaConfig(vocab_size=VOCAB, hidden_size=60, intermediate_size=84, num_hidden_layers=1,
                      num_attention_heads=6, num_key_value_heads=2)  # head size 10: not a multiple of 16
    save_tiny_model(odd, tmp_path)
    model = load_model(tmp_path, dtype=torch.float32, device="cpu")
    assert _natives(model) == [None]  # nothing swapped yet
    assert to_cpu_serving(model) and _natives(model) == [None]


def test_a_slot_outside_the_cache_is_refused_before_anything_is_written(tmp_path):
    model = _model("llama-gqa", tmp_path)
    ids, positions, ctx, pools = _decode_batch(model, [5, 9], 4)
    outside = pools[0].shape[0] * pools[0].shape[1]
    bad = AttentionContext(cu_seqlens=ctx.cu_seqlens, seqlens=ctx.seqlens, max_seqlen=1,
                           slot_mapping=torch.tensor([0, outside]), block_tables=ctx.block_tables,
                           context_lens=ctx.context_lens, reads_cache=True,
                           context_lens_tensor=ctx.context_lens_tensor)
    before = [p.clone() for p in pools]
    with pytest.raises(ValueError, match="outside the cache"), torch.inference_mode():
        model(ids, positions, bad)
    for pool, saved in zip(pools, before):
        torch.testing.assert_close(pool, saved, equal_nan=True, atol=0, rtol=0)


def test_the_engine_decodes_through_the_native_layers(tmp_path, cpu_kernels):
    save_tiny_model(CONFIGS["llama-gqa"], tmp_path)
    save_tiny_tokenizer(tmp_path, VOCAB)
    llm = LLM(tmp_path, dtype=torch.float32, device="cpu", kv_cache_memory=1 << 22)
    natives = _natives(llm.model)
    assert all(n is not None for n in natives)
    prompts = [[5, 6, 7], list(range(10, 40)), [3]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    native = llm.generate(prompts, params, use_tqdm=False)
    _set_layers(llm.model, [_per_operation(n) for n in natives])
    per_op = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(native, per_op):
        assert a.token_ids == b.token_ids
        got = [lp[t] for lp, t in zip(a.outputs[0].logprobs, a.token_ids)]
        want = [lp[t] for lp, t in zip(b.outputs[0].logprobs, b.token_ids)]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)
