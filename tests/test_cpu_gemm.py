"""The packed CPU GEMMs (kernels.cpu.gemm: our native kernel and oneDNN's) give F.linear's results,
layer by layer and for a whole model, checked against float64."""

import os
import shutil

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from conftest import interpreted, save_tiny_model, save_tiny_tokenizer
from engine import LLM, load_model
from engine.model.cpu_serving import NativeRMSNorm, NativeRoPE, PackedLinear, PackedLowRankLinear, to_cpu_serving
from engine.model.layers import Linear, LowRankLinear
from kernels.cpu import build as cpu_native
from kernels.cpu.gemm import can_pack, kernel_for, onednn_available, pack, packed_linear, packed_lowrank

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=0.05, rtol=0.01)}
KERNELS = ["native", "onednn"]


def _require(kernel: str) -> None:
    """Skip where this machine cannot have the kernel; where it can, a failed build fails the test."""
    if kernel == "native" and shutil.which(os.environ.get("CC") or "cc") is None:
        pytest.skip("no C compiler to build the native kernel")
    if kernel == "native" and os.environ.get(cpu_native.DISABLE_ENV) == "0":
        pytest.skip(f"{cpu_native.DISABLE_ENV}=0 turns the native kernels off")
    if kernel == "onednn" and not onednn_available():
        pytest.skip("this torch build has no oneDNN")


def _reference(x, w, bias=None):
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("kernel,dtype", [("native", torch.float32), ("onednn", torch.float32),
                                          ("onednn", torch.bfloat16)])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 33, 64, 300])
# (70, 33) and (52, 20): AVX-512's three-panel float tiles, then a last tile of two panels or one
@pytest.mark.parametrize("shape", [(96, 40), (1536, 576), (37, 131), (5, 7), (70, 33), (52, 20)])
def test_packed_linear_matches_float64(rows, shape, kernel, dtype):
    _require(kernel)
    if dtype == torch.bfloat16 and not can_pack(torch.ones(1, 1, dtype=dtype)):
        pytest.skip("oneDNN has no bf16 on this CPU")
    out_f, in_f = shape
    w, bias = torch.randn(shape).to(dtype), torch.randn(out_f).to(dtype)
    x = torch.randn(rows, in_f).to(dtype)
    packed = pack(w, kernel)
    assert packed.kernel == kernel
    for b in (None, bias):
        y = packed_linear(x, packed, b)
        assert y.shape == (rows, out_f) and y.dtype == dtype
        torch.testing.assert_close(y.double(), _reference(x, w, b), **TOL[dtype])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows", [1, 5, 16, 31, 70])
@pytest.mark.parametrize("out_f,in_f,rank", [(96, 40, 7), (1536, 576, 248), (37, 131, 16), (20, 9, 1)])
def test_packed_lowrank_matches_float64(rows, out_f, in_f, rank, kernel):
    _require(kernel)
    A, B, bias = torch.randn(out_f, rank), torch.randn(rank, in_f), torch.randn(out_f)
    x = torch.randn(rows, in_f)
    packed_B, packed_A = pack(B, kernel), pack(A, kernel)
    for b in (None, bias):
        want = (x.double() @ B.double().T) @ A.double().T + (0 if b is None else b.double())
        got = packed_lowrank(x, packed_B, packed_A, b)
        assert got.shape == (rows, out_f)
        torch.testing.assert_close(got.double(), want, atol=1e-4 * rank ** 0.5, rtol=1e-4)


@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_gemms_take_batched_and_strided_inputs(kernel):
    _require(kernel)
    w, A, B = torch.randn(48, 80), torch.randn(48, 6), torch.randn(6, 80)
    packed, packed_B, packed_A = pack(w, kernel), pack(B, kernel), pack(A, kernel)
    low = A.double() @ B.double()
    for x in (torch.randn(2, 5, 80), torch.randn(80, 7).T, torch.randn(0, 80)):  # 3-D, column-major, empty
        torch.testing.assert_close(packed_linear(x, packed).double(), _reference(x, w), **TOL[torch.float32])
        torch.testing.assert_close(packed_lowrank(x, packed_B, packed_A).double(), _reference(x, low),
                                   **TOL[torch.float32])


def test_native_results_do_not_depend_on_the_thread_count():
    _require("native")
    w, x = torch.randn(300, 64), torch.randn(16, 64)
    packed = pack(w, "native")
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 3):
            torch.set_num_threads(n)
            outs.append(packed_linear(x, packed))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def test_native_kernel_refuses_what_it_cannot_compute():
    _require("native")
    packed = pack(torch.randn(8, 16), "native")
    with pytest.raises(ValueError, match="12 features"):
        packed_linear(torch.randn(3, 12), packed)
    with pytest.raises(ValueError, match="float32"):
        packed_linear(torch.randn(3, 16, dtype=torch.float64), packed)
    with pytest.raises(ValueError, match="float64"):
        packed_linear(torch.randn(3, 16), packed, torch.randn(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="4 values for 8 outputs"):
        packed_linear(torch.randn(3, 16), packed, torch.randn(4))
    with pytest.raises(ValueError, match="rank 8"):
        packed_lowrank(torch.randn(3, 16), packed, pack(torch.randn(4, 5), "native"))
    with pytest.raises(ValueError, match="native"):
        pack(torch.randn(8, 8).bfloat16(), "native")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_pack_refuses_what_no_cpu_kernel_takes(dtype):
    w = torch.randn(8, 8).to(dtype)
    assert not can_pack(w)
    with pytest.raises(ValueError, match=str(dtype)):
        pack(w)


def test_pack_serves_through_onednn_when_the_native_kernel_is_off(monkeypatch):
    _require("onednn")
    monkeypatch.setenv(cpu_native.DISABLE_ENV, "0")
    cpu_native.library.cache_clear()
    try:
        assert kernel_for(torch.randn(4, 4)) == "onednn"
    finally:
        monkeypatch.undo()
        cpu_native.library.cache_clear()


def test_linear_and_lowrank_layers_pack_to_the_same_outputs():
    dense = Linear(40, 24, bias=True)
    low = LowRankLinear(40, 24, rank=7, bias=True)
    for layer in (dense, low):
        for p in layer.parameters():
            p.data = torch.randn_like(p)
    x = torch.randn(9, 40)
    expected = [dense(x), low(x)]
    packed = PackedLinear.from_linear(dense), PackedLowRankLinear.from_lowrank(low)
    assert not any(isinstance(t, torch.Tensor) for t in vars(packed[0]).values())  # the dense copies are not kept
    for layer, want in zip(packed, expected):
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
    assert to_cpu_serving(model)
    assert isinstance(model.lm_head, PackedLinear)  # tied or not
    native = cpu_native.library() is not None  # then norms and RoPE run natively too, checked here as a whole
    assert isinstance(model.model.norm, NativeRMSNorm) == native
    assert isinstance(model.model.layers[0].self_attn.rope, NativeRoPE) == native
    for got, want in zip(model.forward_sequences(seqs), before):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_model_no_cpu_kernel_takes_is_left_as_it_is(tmp_path):
    save_tiny_model(TINY["llama-tied"], tmp_path)
    model = load_model(tmp_path, dtype=torch.float64, device="cpu")
    assert not to_cpu_serving(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear) and model.lm_head is None


def _is_packed(llm: LLM) -> bool:
    return isinstance(llm.model.model.layers[0].mlp.down_proj, PackedLinear)


def test_engine_packs_on_cpu_unless_the_kernels_are_the_subject(tmp_path, cpu_kernels):
    save_tiny_model(TINY["llama-tied"], tmp_path)
    save_tiny_tokenizer(tmp_path, 97)
    assert _is_packed(LLM(tmp_path, dtype=torch.float32, device="cpu", kv_cache_memory=1 << 20))


@interpreted
def test_engine_under_the_triton_interpreter_keeps_plain_weights(tmp_path, monkeypatch):
    import kernels

    monkeypatch.setattr(kernels, "BACKEND", "triton")  # CI's LOWRANK_KERNELS=triton, under the interpreter
    save_tiny_model(TINY["llama-tied"], tmp_path)
    save_tiny_tokenizer(tmp_path, 97)
    assert not _is_packed(LLM(tmp_path, dtype=torch.float32, device="cpu", kv_cache_memory=1 << 20))
