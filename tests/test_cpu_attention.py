"""The native CPU paged decode attention (kernels.cpu.attention) against dense float64 attention.

Blocks are shuffled through the pool and every slot no sequence owns holds NaN, so reading the
wrong block, a slot past the context or outside the window shows as NaN in the output.
"""

import os
import shutil

import pytest
import torch

from conftest import dense_attention_ref, shuffled_paged_pools
from test_kv_int8 import MANY_SEQUENCES
from engine.model.attention import AttentionContext
from engine.model.config import ModelConfig
from engine.model.cpu_serving import NativeAttention, to_cpu_serving
from engine.model.llama import CausalLM
from kernels.cpu import build as cpu_native
from kernels.cpu.attention import native_decode_applies, native_paged_decode

pytestmark = [pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler"),
              pytest.mark.skipif(os.environ.get(cpu_native.DISABLE_ENV) == "0",
                                 reason=f"{cpu_native.DISABLE_ENV}=0 turns the native kernels off")]

LENGTHS = {
    "one-token": [1],
    "chunk-edges": [31, 32, 33, 64, 65],  # the kernel scores 32 keys at a time
    "ragged": [1, 17, 100, 3, 250, 16],
    "many": MANY_SEQUENCES,  # a unit of work takes a sequence's KV heads together
}


def _case(lengths, group, head_dim, block_size, seed=0, hkv=2):
    torch.manual_seed(seed)
    (k_cache, v_cache), tables = shuffled_paged_pools(lengths, [(hkv, head_dim)] * 2, "cpu", block_size)
    q = torch.randn(len(lengths), hkv * group, head_dim)
    ks, vs = [], []
    for i, n in enumerate(lengths):
        ks.append(k_cache[tables[i].long()].flatten(0, 1)[:n])
        vs.append(v_cache[tables[i].long()].flatten(0, 1)[:n])
    return q, k_cache, v_cache, tables, ks, vs


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("head_dim,block_size", [(16, 1), (64, 16), (128, 5)])
@pytest.mark.parametrize("window", [None, 7, 40])
def test_native_decode_matches_float64(lengths, group, head_dim, block_size, window):
    lengths = LENGTHS[lengths]
    q, k_cache, v_cache, tables, ks, vs = _case(lengths, group, head_dim, block_size)
    assert native_decode_applies(q, k_cache, v_cache)
    got = native_paged_decode(q, k_cache, v_cache, tables, torch.tensor(lengths), window)
    want = dense_attention_ref(q, ks, vs, (1,) * len(lengths), window)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("hkv,group", [(3, 3), (4, 16), (3, 16)])  # heads per unit: 3 of 3, 2 of 4, 1 of 3
@pytest.mark.parametrize("threads", [1, 2])
def test_units_of_several_kv_heads_match_float64(hkv, group, threads, monkeypatch):
    """A unit takes as many of a sequence's KV heads as divide them with at most MAX_GROUP query heads."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    q, k_cache, v_cache, tables, ks, vs = _case(MANY_SEQUENCES, group, 64, 16, seed=hkv * group, hkv=hkv)
    got = native_paged_decode(q, k_cache, v_cache, tables, torch.tensor(MANY_SEQUENCES))
    want = dense_attention_ref(q, ks, vs, (1,) * len(MANY_SEQUENCES), None)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_the_engine_decodes_through_it_on_cpu(monkeypatch):
    def reference_not_expected(*args, **kwargs):
        raise AssertionError("a CPU float32 decode step went to the reference")

    monkeypatch.setattr("engine.model.attention.paged_attention", reference_not_expected)
    lengths = [5, 40, 18]
    q, k_cache, v_cache, tables, ks, vs = _case(lengths, 3, 64, 16, seed=1)
    config = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 16, "hidden_size": 384,
                                    "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 6,
                                    "num_key_value_heads": 2})
    model = CausalLM(config)  # the serving form swaps in the native attention (the weights are not read here)
    assert to_cpu_serving(model)
    attention = model.model.layers[0].self_attn
    assert isinstance(attention, NativeAttention)
    attention.kv_cache = (k_cache, v_cache)
    ctx = AttentionContext(cu_seqlens=torch.arange(4, dtype=torch.int32), seqlens=(1, 1, 1), max_seqlen=1,
                           block_tables=tables, context_lens=tuple(lengths), reads_cache=True)
    got = attention._cached_attention(q, ctx)
    torch.testing.assert_close(got.double(), dense_attention_ref(q, ks, vs, (1, 1, 1), None), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("what", ["float64", "bfloat16", "head_dim", "group"])
def test_what_the_kernel_does_not_take_goes_to_the_reference(what):
    dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16}.get(what, torch.float32)
    head_dim = 24 if what == "head_dim" else 64
    group = 33 if what == "group" else 2
    q = torch.randn(2, group, head_dim, dtype=dtype)
    cache = torch.randn(4, 16, 1, head_dim, dtype=dtype)
    assert not native_decode_applies(q, cache, cache)


def test_inputs_the_kernel_would_misread_are_refused():
    q, k_cache, v_cache, tables, *_ = _case([4, 9], 2, 16, 16)
    with pytest.raises(ValueError, match="2 queries, 2 block tables, 1 context lengths"):
        native_paged_decode(q, k_cache, v_cache, tables, torch.tensor([4]))
    for lens, table in ([4, 17], tables), ([4, -1], tables), ([4, 9], tables + 1000), ([4, 9], tables - 1000):
        with pytest.raises(ValueError, match="outside the block tables"):
            native_paged_decode(q, k_cache, v_cache, table, torch.tensor(lens))
    with pytest.raises(ValueError, match="does not take"):
        native_paged_decode(q[..., :8].contiguous(), k_cache, v_cache, tables, torch.tensor([4, 9]))
