"""oneDNN's packed GEMM (engine.cpu_gemm) gives F.linear's results, layer by layer and for a whole model."""

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from conftest import save_tiny_model, save_tiny_tokenizer
from engine import LLM, load_model
from engine.cpu_gemm import can_pack, onednn_available, pack, packed_linear
from engine.layers import Linear, LowRankLinear

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=0.05, rtol=0.01)}


def _reference(x, w, bias=None):
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 64, 300])
@pytest.mark.parametrize("shape", [(96, 40), (1536, 576), (37, 131)])
def test_packed_linear_matches_float64(rows, shape, dtype):
    out_f, in_f = shape
    w, bias = torch.randn(shape).to(dtype), torch.randn(out_f).to(dtype)
    x = torch.randn(rows, in_f).to(dtype)
    packed = pack(w)
    for b in (None, bias):
        y = packed_linear(x, packed, b)
        assert y.shape == (rows, out_f) and y.dtype == dtype
        torch.testing.assert_close(y.double(), _reference(x, w, b), **TOL[dtype])


def test_packed_linear_takes_batched_and_strided_inputs():
    w = torch.randn(48, 80)
    packed = pack(w)
    x3 = torch.randn(2, 5, 80)
    torch.testing.assert_close(packed_linear(x3, packed).double(), _reference(x3, w), **TOL[torch.float32])
    strided = torch.randn(80, 7).T  # [7, 80], column-major
    torch.testing.assert_close(packed_linear(strided, packed).double(), _reference(strided, w), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_pack_refuses_what_onednn_does_not_take(dtype):
    w = torch.randn(8, 8).to(dtype)
    assert not can_pack(w)
    with pytest.raises(ValueError, match=str(dtype)):
        pack(w)


def test_linear_and_lowrank_layers_pack_to_the_same_outputs():
    dense = Linear(40, 24, bias=True)
    low = LowRankLinear(40, 24, rank=7, bias=True)
    for layer in (dense, low):
        for p in layer.parameters():
            p.data = torch.randn_like(p)
    x = torch.randn(9, 40)
    expected = [dense(x), low(x)]
    dense.pack_for_cpu()
    low.pack_for_cpu()
    assert dense.weight is None and low.A is None and low.B is None  # the dense copies are gone
    for layer, want in zip((dense, low), expected):
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


TINY = {
    "llama-tied": LlamaConfig(vocab_size=97, hidden_size=60, intermediate_size=84, num_hidden_layers=2,
                              num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-bias-untied": Qwen2Config(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", TINY)
def test_packed_model_gives_the_same_logits(name, tmp_path):
    save_tiny_model(TINY[name], tmp_path)
    model = load_model(tmp_path, dtype=torch.float32, device="cpu")
    seqs = [torch.randint(0, 97, (n,)) for n in (1, 9, 40)]
    before = model.forward_sequences(seqs)
    assert model.pack_for_cpu()
    assert (model.packed_head is not None) == TINY[name].tie_word_embeddings
    for got, want in zip(model.forward_sequences(seqs), before):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_model_onednn_cannot_take_is_left_as_it_is(tmp_path):
    save_tiny_model(TINY["llama-tied"], tmp_path)
    model = load_model(tmp_path, dtype=torch.float64, device="cpu")
    assert not model.pack_for_cpu()
    assert model.model.layers[0].self_attn.q_proj.weight is not None and model.packed_head is None


def _is_packed(llm: LLM) -> bool:
    return llm.model.model.layers[0].mlp.down_proj.packed is not None


def test_engine_packs_on_cpu_unless_the_kernels_are_the_subject(tmp_path, torch_kernels):
    save_tiny_model(TINY["llama-tied"], tmp_path)
    save_tiny_tokenizer(tmp_path, 97)
    assert _is_packed(LLM(tmp_path, dtype=torch.float32, device="cpu", kv_cache_memory=1 << 20))


def test_engine_under_the_triton_interpreter_keeps_plain_weights(tmp_path, monkeypatch):
    import kernels

    monkeypatch.setattr(kernels, "BACKEND", "triton")  # what CI's TRITON_INTERPRET=1 gives every fp32 tensor
    save_tiny_model(TINY["llama-tied"], tmp_path)
    save_tiny_tokenizer(tmp_path, 97)
    assert not _is_packed(LLM(tmp_path, dtype=torch.float32, device="cpu", kv_cache_memory=1 << 20))
