"""The Triton paged decode attention kernel against the float64 reference, and the engine on it."""

import pytest
import torch
from transformers import LlamaConfig

import kernels
from conftest import save_tiny_model, save_tiny_tokenizer, shuffled_paged_pools
from kernels.paged_attention import paged_attention_ref, paged_decode_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 2e-2, 2e-2)]
LENGTHS = (1, 15, 16, 17, 63, 65, 130)  # ragged: inside, at and across block and BLOCK_N edges


def _paged_inputs(lengths, num_heads, num_kv_heads, head_dim, dtype, block_size=16):
    """A cache whose blocks are shuffled across sequences; unused blocks hold NaN so a stray read shows."""
    (k_cache, v_cache), tables = shuffled_paged_pools(lengths, [(num_kv_heads, head_dim)] * 2, DEVICE, block_size)
    q = torch.randn(len(lengths), num_heads, head_dim, device=DEVICE)
    return q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), tables


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(9, 3, 64), (4, 4, 32), (16, 2, 64), (32, 8, 128)],
                         ids=["smollm2-gqa3", "mha", "gqa8", "llama3-8b"])
@pytest.mark.parametrize("window", [None, 5])
def test_matches_reference(dtype, atol, rtol, num_heads, num_kv_heads, head_dim, window):
    q, k_cache, v_cache, tables = _paged_inputs(LENGTHS, num_heads, num_kv_heads, head_dim, dtype)
    lens = torch.tensor(LENGTHS, dtype=torch.int32, device=DEVICE)
    out = paged_decode_triton(q, k_cache, v_cache, tables, lens, window)
    ref = paged_attention_ref(q.double(), k_cache.double(), v_cache.double(), tables, LENGTHS, (1,) * len(LENGTHS),
                              window)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref.to(dtype), atol=atol, rtol=rtol)


@pytest.mark.slow
def test_long_context():
    lengths = (4099, 1, 2048)
    q, k_cache, v_cache, tables = _paged_inputs(lengths, 32, 8, 128, torch.float16)
    out = paged_decode_triton(q, k_cache, v_cache, tables, torch.tensor(lengths, dtype=torch.int32, device=DEVICE))
    ref = paged_attention_ref(q.double(), k_cache.double(), v_cache.double(), tables, lengths, (1, 1, 1))
    torch.testing.assert_close(out, ref.half(), atol=2e-3, rtol=2e-3)


def test_bad_shapes_are_refused():
    q, k_cache, v_cache, tables = _paged_inputs((5,), 4, 2, 24, torch.float32)  # head_dim not a power of two
    with pytest.raises(ValueError, match="power of two"):
        paged_decode_triton(q, k_cache, v_cache, tables, torch.tensor([5], dtype=torch.int32, device=DEVICE))


def test_dispatch_sends_decode_steps_to_the_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "paged_decode_triton", lambda *a: calls.append(a) or torch.zeros(1))
    q, k_cache, v_cache, tables = _paged_inputs((3, 20), 4, 2, 32, torch.float32)
    kernels.paged_attention(q, k_cache, v_cache, tables, (3, 20), (1, 1))
    assert len(calls) == 1
    prefill_q = torch.randn(4, 4, 32, device=DEVICE)
    kernels.paged_attention(prefill_q, k_cache, v_cache, tables, (3, 20), (1, 3))  # a chunk: the reference
    assert len(calls) == 1


PROMPTS = [[1, 5, 9, 13, 2], [7] * 19, [3, 4]]  # ragged; 3 sequences run in a graph slot of 4
GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}


@pytest.fixture
def tiny_model_dir(tmp_path):
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    save_tiny_model(config, tmp_path)
    save_tiny_tokenizer(tmp_path, config.vocab_size)
    return tmp_path


def _greedy_tokens(llm) -> list[list[int]]:
    from engine import SamplingParams

    return [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(**GREEDY), use_tqdm=False)]


def test_engine_on_the_kernels_matches_the_torch_path(tiny_model_dir, monkeypatch):
    """The whole engine on a tiny model: decode attention through the (interpreted) Triton kernel."""
    from engine import LLM

    tokens = {}
    for backend in ("triton", "torch"):
        monkeypatch.setattr(kernels, "BACKEND", backend)
        tokens[backend] = _greedy_tokens(LLM(tiny_model_dir, dtype="float32", device=DEVICE, kv_cache_memory=1 << 20))
    assert tokens["triton"] == tokens["torch"]


def test_static_decode_path_of_the_cuda_graphs_gives_the_same_tokens(tiny_model_dir):
    """The graph path's static buffers, padded rows and scratch block, run eagerly (no capture on CPU)."""
    from engine import LLM

    settings = dict(dtype="float32", device=DEVICE, kv_cache_memory=1 << 20, max_num_seqs=8)
    expected = _greedy_tokens(LLM(tiny_model_dir, cuda_graphs=False, **settings))
    static = LLM(tiny_model_dir, **settings)
    if static.runner.graphs is None:  # CPU: no capture, the same static path run eagerly
        static.runner.use_static_decode()
    steps = []
    run = static.runner.graphs.run
    static.runner.graphs.run = lambda *args: steps.append(len(args[0])) or run(*args)
    assert _greedy_tokens(static) == expected
    assert steps and 3 in steps  # decode steps went through the static path, with a padded row
