"""LoRC: latent K/V folders from tiny random models, their ranks, and the engine serving them."""

import json
import math

import pytest
import torch
from server_harness import spawn  # noqa: F401 (a fixture)
from transformers import LlamaConfig, Qwen2Config

from conftest import interpreted, save_tiny_model, save_tiny_tokenizer
from converters.cli import main
from converters.compress import CompressConfig, compress
from converters.factorize import Factors
from converters.lorc import KVPrepared, LoRCConfig, kv_names, lorc, progressive_ranks, write_latent_folder
from engine import LLM, SamplingParams, load_model
from engine.core.kv_cache import bytes_per_block
from engine.eval.reference_decoding import stream_tokens
from engine.model.layers import LowRankLinear

VOCAB = 101
CONFIGS = {
    "llama-gqa": LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                             bos_token_id=None, eos_token_id=None),
    "qwen2-bias": Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                              bos_token_id=None, eos_token_id=None),
}
WIDTH = 64  # n_kv · head_dim of both configs


def _folder(tmp_path, name="llama-gqa"):
    src = tmp_path / "dense"
    hf = save_tiny_model(CONFIGS[name], src)
    save_tiny_tokenizer(src, VOCAB)
    text = tmp_path / "calib.txt"
    gen = torch.Generator().manual_seed(7)
    text.write_text(" ".join(f"t{i}" for i in torch.randint(2, VOCAB, (6000,), generator=gen).tolist()))
    return hf, src, text


def _config(text, kv_ratio=0.5, schedule="progressive"):
    return LoRCConfig(kv_ratio=kv_ratio, schedule=schedule, calib=str(text), samples=8, seq_len=64,
                      probe_samples=2, probe_seq_len=32)


def test_progressive_ranks_follow_sensitivity_within_the_budget():
    sigma = torch.linspace(2.0, 0.1, 16, dtype=torch.float64)
    factors = {name: Factors(torch.eye(16, dtype=torch.float64), sigma, torch.eye(16, dtype=torch.float64))
               for name in ("l0.k", "l0.v", "l1.k", "l1.v")}
    sensitivity = {"l0.k": 8.0, "l0.v": 8.0, "l1.k": 1.0, "l1.v": 0.0}
    ranks = progressive_ranks(factors, sensitivity, budget=30, caps=dict.fromkeys(factors, 16))
    assert sum(ranks.values()) == 30
    assert ranks["l0.k"] == ranks["l0.v"] > ranks["l1.k"] > ranks["l1.v"] == 1  # the floor: one component
    assert max(ranks.values()) <= 16


@pytest.mark.parametrize("schedule", ["progressive", "uniform"])
def test_folder_meets_the_kv_budget_and_records_it(tmp_path, schedule):
    _, src, text = _folder(tmp_path)
    manifest = lorc(src, tmp_path / "out", _config(text, 0.5, schedule))
    kv = json.loads((tmp_path / "out" / "lowrank.json").read_text())["kv_latent"]
    assert kv == manifest["kv_latent"] and kv["schedule"] == schedule and kv["width"] == WIDTH
    total = sum(r_k + r_v for r_k, r_v in kv["ranks"])
    assert total == 3 * 2 * 32 and kv["achieved_kv_ratio"] == pytest.approx(0.5)
    if schedule == "uniform":
        assert all(r == [32, 32] for r in kv["ranks"])
    else:
        values = [s for pair in kv["sensitivity"] for s in pair]
        assert len(kv["sensitivity"]) == 3 and all(math.isfinite(s) for s in values) and max(values) > 0
    model = load_model(tmp_path / "out", device="cpu")
    for (k, v), (r_k, r_v) in zip(kv_names(model), kv["ranks"]):
        assert model.get_submodule(k).rank == r_k and model.get_submodule(v).rank == r_v
    assert all(layer.self_attn.latent for layer in model.model.layers)


def _full_rank_folder(tmp_path, name):
    """The dense model with K/V stored as latents of full rank: it must compute what the dense one does."""
    hf, src, text = _folder(tmp_path, name)
    model = load_model(src, device="cpu")
    factors = {}
    for pair in kv_names(model):
        for n in pair:
            W = model.get_submodule(n).weight.double()
            U, S, Vt = torch.linalg.svd(W, full_matrices=False)
            factors[n] = Factors(U, S, Vt)
    kv = {"kv_ratio": 0.0, "schedule": "uniform", "width": WIDTH, "achieved_kv_ratio": 0.0,
          "ranks": [[WIDTH, WIDTH]] * model.config.num_layers}
    prepared = KVPrepared(src, model, [], factors, kv_names(model), WIDTH, dict.fromkeys(factors, WIDTH), 0.0)
    write_latent_folder(prepared, tmp_path / "full", kv)
    return hf, tmp_path / "full"


@pytest.mark.parametrize("name", CONFIGS)
def test_full_rank_latents_give_the_dense_logits(tmp_path, name):
    hf, folder = _full_rank_folder(tmp_path, name)
    ours = load_model(folder, device="cpu")
    seq = torch.randint(0, VOCAB, (21,))
    with torch.no_grad():
        expected = hf(seq[None]).logits[0]
    torch.testing.assert_close(ours.forward_sequences([seq])[0], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", CONFIGS)
def test_engine_on_latents_equals_the_reference_decoding(tmp_path, name, cpu_kernels):
    _, src, text = _folder(tmp_path, name)
    lorc(src, tmp_path / "out", _config(text, 0.5))
    reference = load_model(tmp_path / "out", device="cpu")
    llm = LLM(tmp_path / "out", dtype="float32", device="cpu", kv_cache_memory=1 << 20, max_model_len=128)
    prompts = [torch.randint(2, VOCAB, (n,)).tolist() for n in (3, 17, 40)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == list(stream_tokens(reference, prompt, 12))


def test_latent_cache_fits_more_blocks_and_survives_preemption_and_prefix_hits(tmp_path, cpu_kernels):
    _, src, text = _folder(tmp_path)
    lorc(src, tmp_path / "out", _config(text, 0.5, "uniform"))
    dense = load_model(src, device="cpu")
    latent = load_model(tmp_path / "out", device="cpu")
    assert bytes_per_block(latent, 16) * 2 == bytes_per_block(dense, 16)  # kv_ratio 0.5: half the bytes
    prompts = [[5 + i] * 30 + torch.randint(2, VOCAB, (10,)).tolist() for i in range(4)]
    prompts.append(prompts[0][:35] + [7, 8, 9])  # shares two full blocks with the first prompt
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    roomy = LLM(tmp_path / "out", dtype="float32", device="cpu", kv_cache_memory=1 << 20, max_model_len=128,
                enable_prefix_caching=False).generate(prompts, params, use_tqdm=False)
    per_block = bytes_per_block(latent, 16)
    tight = LLM(tmp_path / "out", dtype="float32", device="cpu", kv_cache_memory=9 * per_block, max_model_len=128,
                max_num_seqs=8)
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    cached = LLM(tmp_path / "out", dtype="float32", device="cpu", kv_cache_memory=1 << 20, max_model_len=128)
    first = cached.generate(prompts[0], params, use_tqdm=False)[0]
    sharer = cached.generate(prompts[4], params, use_tqdm=False)[0]
    assert sharer.num_cached_tokens == 32  # two full blocks of latents came from the cache
    assert (first.token_ids, sharer.token_ids) == (roomy[0].token_ids, roomy[4].token_ids)


def test_on_top_of_a_compressed_folder(tmp_path, cpu_kernels):
    _, src, text = _folder(tmp_path)
    weights = tmp_path / "svd-llm"
    compress(src, weights, CompressConfig(ratio=0.3, method="svd-llm", calib=str(text), samples=8, seq_len=64))
    manifest = lorc(weights, tmp_path / "out", _config(text, 0.25))
    source = json.loads((weights / "lowrank.json").read_text())
    before = source["modules"]
    for name, m in manifest["modules"].items():
        if name.endswith(("k_proj", "v_proj")):
            assert m["latent"] and m["factorized"]
            assert m["rank"] <= before[name]["rank"]  # no padding past what the compressed source kept
        else:
            assert m == before[name]  # the other projections are untouched
    assert manifest["achieved_ratio"] >= source["achieved_ratio"]  # the latents undo none of the compression
    model = load_model(tmp_path / "out", device="cpu")
    assert isinstance(model.model.layers[0].mlp.up_proj, LowRankLinear)
    again = lorc(tmp_path / "out", tmp_path / "again", _config(text, 0.5))  # a latent folder, converted again
    for name, m in again["modules"].items():
        if m.get("latent"):
            assert m["rank"] <= manifest["modules"][name]["rank"]
    smaller = load_model(tmp_path / "out", device="cpu", ratio=manifest["achieved_ratio"] + 0.1)
    for (k, v), (r_k, r_v) in zip(kv_names(smaller), manifest["kv_latent"]["ranks"]):
        assert smaller.get_submodule(k).rank == r_k and smaller.get_submodule(v).rank == r_v  # latents stay


def test_cli_kv_ratio_alone_and_with_ratio(tmp_path, capsys, cpu_kernels):
    _, src, text = _folder(tmp_path)
    common = ["--calib", str(text), "--samples", "8", "--seq-len", "64"]
    assert main(["compress", str(src), "--kv-ratio", "0.5", "--kv-schedule", "uniform", "--out",
                 str(tmp_path / "kv"), *common]) == 0
    assert "KV cache: 0.5000 of its bytes removed" in capsys.readouterr().out
    assert main(["compress", str(src), "--ratio", "0.3", "--method", "svd-llm", "--kv-ratio", "0.5", "--out",
                 str(tmp_path / "both"), *common]) == 0
    manifest = json.loads((tmp_path / "both" / "lowrank.json").read_text())
    assert manifest["method"] == "svd-llm" and manifest["kv_latent"]["kv_ratio"] == 0.5
    assert not list(tmp_path.glob(".both.weights-*"))  # the intermediate folder is gone
    assert main(["compress", str(src), "--out", str(tmp_path / "none")]) == 2
    assert "give --ratio" in capsys.readouterr().err
    assert main(["compress", str(src), "--kv-ratio", "1.5", "--out", str(tmp_path / "bad"), *common]) == 2
    assert "kv_ratio must be in (0, 1)" in capsys.readouterr().err


@interpreted
def test_engine_decodes_through_the_latent_kernel(tmp_path, monkeypatch):
    import kernels

    _, src, text = _folder(tmp_path)
    lorc(src, tmp_path / "out", _config(text, 0.5))
    reference = load_model(tmp_path / "out", device="cpu")
    launches = []

    def counted(*args, **kwargs):
        launches.append(args[0].shape[0])
        return kernels.latent_decode_triton.__wrapped__(*args, **kwargs)

    counted.__wrapped__ = kernels.latent_decode_triton
    monkeypatch.setattr(kernels, "BACKEND", "triton")  # CI's interpreter; on a GPU the compiled kernel
    monkeypatch.setattr(kernels, "latent_decode_triton", counted)
    llm = LLM(tmp_path / "out", dtype="float32", device="cpu", kv_cache_memory=1 << 20, max_model_len=64)
    prompts = [[3, 4, 5], torch.randint(2, VOCAB, (20,)).tolist()]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert launches and max(launches) == 2  # the batch's decode steps ran the kernel
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == list(stream_tokens(reference, prompt, 6))
        # each decoded token's log-probability equals the reference model's (factorised K/V, no cache)
        logits = reference.forward_sequences([prompt + out.token_ids])[0].double().log_softmax(-1)
        for i, (token, entry) in enumerate(zip(out.token_ids, out.outputs[0].logprobs)):
            assert entry[token] == pytest.approx(logits[len(prompt) - 1 + i, token].item(), abs=1e-4)


def test_server_reports_the_latent_cache_in_metrics(tmp_path, spawn, cpu_kernels):
    import openai

    _, src, text = _folder(tmp_path)
    lorc(src, tmp_path / "out", _config(text, 0.5, "uniform"))
    budget = ["--kv-cache-memory", str(1 << 20), "--max-model-len", "64"]
    dense, latent = spawn(src, *budget), spawn(tmp_path / "out", "--served-model-name", "tiny", *budget)
    m_dense, m_latent = dense.metrics(), latent.metrics()
    per_token = 3 * 2 * WIDTH * 4  # 3 layers, K and V of width 64, fp32
    assert m_dense["lowrank:kv_cache_bytes_per_token"] == per_token
    assert m_latent["lowrank:kv_cache_bytes_per_token"] == per_token // 2
    assert m_dense["lowrank:kv_cache_blocks"] == (1 << 20) // (16 * per_token)  # 42 blocks of 16 tokens
    assert m_latent["lowrank:kv_cache_blocks"] == (1 << 20) // (16 * per_token // 2)  # 85
    with openai.OpenAI(base_url=latent.url, api_key="x", max_retries=0, timeout=60) as client:
        reply = client.completions.create(model="tiny", prompt="t5 t6 t7", max_tokens=5, temperature=0)
    assert reply.usage.completion_tokens == 5


@interpreted
def test_static_decode_path_on_latents_gives_the_same_tokens(tmp_path, monkeypatch):
    """The CUDA-graph path's static buffers (device lengths only, padded rows) over a latent cache."""
    import kernels

    _, src, text = _folder(tmp_path)
    lorc(src, tmp_path / "out", _config(text, 0.5, "uniform"))
    monkeypatch.setattr(kernels, "BACKEND", "triton")  # the latent decode kernel, as in a captured graph
    settings = dict(dtype="float32", device="cpu", kv_cache_memory=1 << 20, max_model_len=64, max_num_seqs=4)
    prompts = [[3, 4, 5], [9] * 12, torch.randint(2, VOCAB, (20,)).tolist()]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    expected = [o.token_ids for o in LLM(tmp_path / "out", **settings).generate(prompts, params, use_tqdm=False)]
    static = LLM(tmp_path / "out", **settings)
    static.runner.use_static_decode()
    steps = []
    run = static.runner.graphs.run
    static.runner.graphs.run = lambda *args: steps.append(len(args[0])) or run(*args)
    assert [o.token_ids for o in static.generate(prompts, params, use_tqdm=False)] == expected
    assert steps and 3 in steps  # decode steps went through the static path, with a padded row
