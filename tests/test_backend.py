"""The kernel paths (kernels.backend): which one a device and LOWRANK_KERNELS give, what each says
it takes, and that the engine's load-time answer is what its steps then run."""

import os
import shutil

import pytest
import torch
from transformers import LlamaConfig

import kernels
from conftest import dense_attention_ref, interpreted, save_tiny_model, save_tiny_tokenizer, shuffled_paged_pools
from engine.model.attention import AttentionContext
from engine.model.config import ModelConfig
from engine.model.cpu_serving import NativeAttention, to_cpu_serving
from engine.model.llama import Attention, CausalLM
from kernels.backend import MAX_RANK_V, NATIVE, TORCH, TRITON, select
from kernels.cpu import build as cpu_native

native_built = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None
                                  or os.environ.get(cpu_native.DISABLE_ENV) == "0", reason="no native CPU kernels")


@pytest.mark.parametrize("name, device, expected", [
    ("auto", "cpu", NATIVE), ("auto", "cuda", TRITON), ("auto", "meta", TORCH),
    ("torch", "cpu", TORCH), ("torch", "cuda", TORCH),
    pytest.param("triton", "cpu", TRITON, marks=interpreted), ("triton", "cuda", TRITON),
])
def test_each_device_and_setting_gives_one_path(name, device, expected):
    assert select(name, device) is expected


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr("kernels.backend.INTERPRET", False)
    with pytest.raises(ValueError, match="LOWRANK_KERNELS=triton on cpu needs TRITON_INTERPRET=1"):
        select("triton", "cpu")


def test_what_each_path_takes():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert TRITON.runs_gemm(torch.ones(1, dtype=dtype))
        assert not NATIVE.runs_gemm(torch.ones(1, dtype=dtype)) and not TORCH.runs_gemm(torch.ones(1, dtype=dtype))
    assert not TRITON.runs_gemm(torch.ones(1, dtype=torch.float64))
    # Triton's paged decode: power-of-two heads >= 16, whole groups; its latent decode: >= 32, bounded value rank
    assert TRITON.decodes(8, 2, 64, torch.bfloat16) and TRITON.decodes(4, 4, 16, torch.float32)
    assert not TRITON.decodes(8, 2, 48, torch.float16) and not TRITON.decodes(6, 4, 64, torch.float16)
    assert not TRITON.decodes(8, 2, 64, torch.float64)
    assert TRITON.decodes(8, 2, 32, torch.float16, value_rank=MAX_RANK_V)
    assert not TRITON.decodes(8, 2, 16, torch.float16, value_rank=8)
    assert not TRITON.decodes(8, 2, 64, torch.float16, value_rank=MAX_RANK_V + 1)
    # no latent decode kernel on CPU, nothing at all on the torch path
    assert not NATIVE.decodes(8, 2, 64, torch.float32, value_rank=8) and not NATIVE.decodes(8, 2, 64, torch.bfloat16)
    assert not TORCH.decodes(8, 2, 64, torch.float32)
    assert NATIVE.cpu_serving and not TRITON.cpu_serving and not TORCH.cpu_serving
    assert TRITON.flash and not NATIVE.flash and not TORCH.flash


def test_graphs_capture_only_when_every_layer_decodes_through_the_kernel():
    assert TRITON.graphs_capture(8, 2, 64, torch.float16, [None, None])
    assert TRITON.graphs_capture(8, 2, 64, torch.float16, [16, 64])
    assert not TRITON.graphs_capture(8, 2, 64, torch.float16, [16, MAX_RANK_V + 1])  # one layer on the reference
    assert not TRITON.graphs_capture(8, 2, 48, torch.float16, [None])
    assert not NATIVE.graphs_capture(8, 2, 64, torch.float32, [None]) and not TORCH.graphs_capture(8, 2, 64,
                                                                                                   torch.float32, [None])


@native_built
def test_native_heads_are_the_librarys_answer():
    lib = cpu_native.library()
    for heads, kv, dim in [(6, 2, 64), (4, 4, 16), (64, 1, 64), (2, 2, 24)]:
        assert NATIVE.decodes(heads, kv, dim, torch.float32) is bool(lib.lowrank_cpu_paged_decode_supports(heads, kv,
                                                                                                              dim))
    assert NATIVE.decodes(6, 2, 64, torch.float32) and not NATIVE.decodes(2, 2, 24, torch.float32)


def _decode_step(lengths, heads, kv_heads, head_dim):
    """A decode step over a shuffled paged cache: (q, caches, tables, ctx, the float64 answer)."""
    (k_cache, v_cache), tables = shuffled_paged_pools(lengths, [(kv_heads, head_dim)] * 2, "cpu")
    q = torch.randn(len(lengths), heads, head_dim)
    ks = [k_cache[tables[i].long()].flatten(0, 1)[:n] for i, n in enumerate(lengths)]
    vs = [v_cache[tables[i].long()].flatten(0, 1)[:n] for i, n in enumerate(lengths)]
    ctx = AttentionContext(cu_seqlens=torch.arange(len(lengths) + 1, dtype=torch.int32), seqlens=(1,) * len(lengths),
                           max_seqlen=1, block_tables=tables, context_lens=tuple(lengths), reads_cache=True)
    return q, (k_cache, v_cache), tables, ctx, dense_attention_ref(q, ks, vs, (1,) * len(lengths), None)


def _no_triton(*args):
    raise AssertionError("a CPU step on the auto path reached a Triton launcher")


@pytest.mark.parametrize("head_dim", [64, 24])  # one the native kernel takes, one it refuses
def test_the_auto_path_never_launches_triton_on_cpu(monkeypatch, head_dim):
    """`kernels.paged_attention` called directly (no serving form) on CPU under auto: the reference."""
    monkeypatch.setattr(kernels, "BACKEND", "auto")
    monkeypatch.setattr(kernels, "paged_decode_triton", _no_triton)
    monkeypatch.setattr(kernels, "latent_decode_triton", _no_triton)
    q, (k_cache, v_cache), tables, ctx, want = _decode_step([5, 40, 18], 6, 2, head_dim)
    assert not kernels.decode_kernel_applies(q, k_cache, (1, 1, 1))
    got = kernels.paged_attention(q, k_cache, v_cache, tables, ctx.context_lens, (1, 1, 1))
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    assert not kernels.latent_decode_kernel_applies(q, k_cache[..., 0, :], (1, 1, 1))


@native_built
def test_heads_the_native_kernel_refuses_keep_the_plain_attention(monkeypatch):
    """Decided at the swap: such a layer's decode steps run the torch reference, every step."""
    monkeypatch.setattr(kernels, "BACKEND", "auto")
    monkeypatch.setattr(kernels, "paged_decode_triton", _no_triton)
    config = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 16, "hidden_size": 48,
                                    "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "num_key_value_heads": 2})  # head_dim 24
    model = CausalLM(config)
    assert to_cpu_serving(model)
    attention = model.model.layers[0].self_attn
    assert type(attention) is Attention and not isinstance(attention, NativeAttention)
    q, attention.kv_cache, _, ctx, want = _decode_step([3, 17], 2, 2, 24)
    torch.testing.assert_close(attention._cached_attention(q, ctx).double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name, packed", [("auto", True), ("torch", False),
                                          pytest.param("triton", False, marks=interpreted)])
def test_the_engine_asks_once_at_load(tmp_path, monkeypatch, name, packed):
    from engine import LLM
    from engine.model.cpu_serving import PackedLinear

    monkeypatch.setattr(kernels, "BACKEND", name)
    save_tiny_model(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=2), tmp_path)
    save_tiny_tokenizer(tmp_path, 97)
    llm = LLM(tmp_path, dtype="float32", device="cpu", kv_cache_memory=1 << 20)
    assert llm.runner.backend.name == {"auto": "native", "torch": "torch", "triton": "triton"}[name]
    assert isinstance(llm.model.model.layers[0].mlp.down_proj, PackedLinear) is packed
