"""bench/synthetic.py: real-shaped random models in the formats the engine and transformers load."""

import json
import sys
from pathlib import Path

import pytest
import torch

if str(Path(__file__).resolve().parents[1] / "bench") not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))
import synthetic  # noqa: E402

from engine.model.checkpoint import read_manifest  # noqa: E402
from engine.model.layers import LowRankLinear  # noqa: E402
from engine.model.loader import load_model  # noqa: E402
from engine.model.rank_budget import lowrank_params  # noqa: E402


def test_real_shapes_and_their_ranks():
    """The 8B shape's linears as the published config gives them, and ranks that meet the ratio."""
    shapes = synthetic.linear_shapes(synthetic.SHAPES["llama3-8b"])
    assert len(shapes) == 32 * 7
    assert shapes["model.layers.0.self_attn.q_proj"] == (4096, 4096)
    assert shapes["model.layers.0.self_attn.k_proj"] == (1024, 4096)
    assert shapes["model.layers.31.mlp.down_proj"] == (4096, 14336)
    ranks = synthetic.uniform_ranks(shapes, 0.4)
    total = sum(o * i for o, i in shapes.values())
    kept = sum(min(lowrank_params(ranks[n], s), s[0] * s[1]) for n, s in shapes.items())
    assert abs((1 - kept / total) - 0.4) < 0.005
    qwen = synthetic.parameter_shapes(synthetic.SHAPES["qwen2-7b"])
    assert qwen["model.layers.0.self_attn.q_proj.bias"] == (3584,) and "lm_head.weight" in qwen


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2"])
def test_folders_load_in_the_engine_and_transformers(tmp_path, shape, cpu_kernels):
    from transformers import AutoModelForCausalLM

    from engine import LLM, SamplingParams

    dense = synthetic.build(shape, tmp_path, torch.float32)
    low = synthetic.build(shape, tmp_path, torch.float32, ratio=0.4)
    latent = synthetic.build(shape, tmp_path, torch.float32, ratio=0.4, kv_ratio=0.5)
    ids = torch.randint(3, synthetic.SHAPES[shape]["vocab_size"], (1, 12))
    ours = load_model(dense, device="cpu", dtype="float32").forward_sequences([ids[0].tolist()])[0]
    hf = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours, hf(ids).logits[0], atol=1e-4, rtol=1e-4)
    manifest = read_manifest(low)
    assert abs(manifest["achieved_ratio"] - 0.4) < 0.01 and manifest["kv_latent"] is None
    model = load_model(low, device="cpu", dtype="float32")
    factorised = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert factorised and factorised == {n: m["rank"] for n, m in manifest["modules"].items() if m["factorized"]}
    assert load_model(low, device="cpu", dtype="float32", ratio=0.5)  # the scores serve a larger ratio
    latent_manifest = read_manifest(latent)
    width = synthetic.SHAPES[shape]["num_key_value_heads"] * 32
    assert latent_manifest["kv_latent"]["ranks"][0] == [width // 2, width // 2]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for folder in (dense, low, latent):
        out = LLM(folder, dtype="float32", device="cpu", kv_cache_memory=1 << 20).generate([ids[0].tolist()], params,
                                                                                             use_tqdm=False)
        assert len(out[0].token_ids) == 4
    assert LLM(latent, dtype="float32", device="cpu", kv_cache_memory=1 << 20).model.model.layers[0].self_attn.latent


def test_a_folder_with_the_same_recipe_is_kept_and_another_remade(tmp_path):
    first = synthetic.build("tiny-llama", tmp_path, torch.float32, ratio=0.4)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert synthetic.build("tiny-llama", tmp_path, torch.float32, ratio=0.4) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    synthetic.build("tiny-llama", tmp_path, torch.float32, ratio=0.4, seed=1)
    assert (first / "model.safetensors").stat().st_mtime_ns != stamp
    assert json.loads((first / synthetic.RECIPE).read_text())["seed"] == 1


def test_committed_ranks_are_used(tmp_path):
    reference = synthetic.build("tiny-llama", tmp_path / "a", torch.float32, ratio=0.5)
    ranks = synthetic.committed_ranks(reference / "lowrank.json")
    again = synthetic.build("tiny-llama", tmp_path / "b", torch.float32, ratio=0.5, ranks=ranks)
    assert {n: m["rank"] for n, m in read_manifest(again)["modules"].items() if m["factorized"]} == ranks
