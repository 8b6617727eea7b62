"""Our model code gives transformers' logits on tiny random Llama / Mistral / Qwen2 models."""

import json

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from conftest import save_tiny_model
from engine import ModelFolderError, load_model

VOCAB = 97


def _llama(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=60, intermediate_size=84, num_hidden_layers=3,
                num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaConfig(**(base | kw))


CONFIGS = {
    "llama-gqa-tied": _llama(tie_word_embeddings=True),
    "llama-mha-untied": _llama(num_key_value_heads=6, tie_word_embeddings=False),
    "llama-bias-headdim": _llama(attention_bias=True, mlp_bias=True, head_dim=12),
    "llama3-rope": _llama(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 16}),
    "llama-linear-rope": _llama(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "mistral-gqa": MistralConfig(vocab_size=VOCAB, hidden_size=56, intermediate_size=72, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=14, sliding_window=4096),
    "qwen2-gqa-tied": Qwen2Config(vocab_size=VOCAB, hidden_size=40, intermediate_size=68, num_hidden_layers=2,
                                  num_attention_heads=5, num_key_value_heads=1, tie_word_embeddings=True),
    "qwen2-mha-untied": Qwen2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
}
LENGTHS = [1, 7, 33, 64]


def _hf_logits(hf, seq):
    with torch.no_grad():
        return hf(seq[None]).logits[0]


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name, tmp_path):
    hf = save_tiny_model(CONFIGS[name], tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32, device="cpu")
    seqs = [torch.randint(0, VOCAB, (n,)) for n in LENGTHS]
    for seq, logits in zip(seqs, ours.forward_sequences(seqs)):  # one packed, padding-free pass
        torch.testing.assert_close(logits, _hf_logits(hf, seq), atol=2e-5, rtol=1e-5)


def test_equal_lengths_batched_path_matches(tmp_path):
    """Equal lengths take the batched SDPA branch; it must agree with the per-sequence one."""
    hf = save_tiny_model(CONFIGS["llama-gqa-tied"], tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32, device="cpu")
    seqs = [torch.randint(0, VOCAB, (20,)) for _ in range(3)]
    for seq, logits in zip(seqs, ours.forward_sequences(seqs)):
        torch.testing.assert_close(logits, _hf_logits(hf, seq), atol=2e-5, rtol=1e-5)


def test_mistral_sliding_window_matches_transformers(tmp_path):
    """A window shorter than the sequence: tokens far back must be masked exactly as HF does."""
    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=5)
    hf = save_tiny_model(config, tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32, device="cpu")
    assert ours.model.layers[0].self_attn.sliding_window == 5
    seqs = [torch.randint(0, VOCAB, (n,)) for n in (4, 19)]
    for seq, logits in zip(seqs, ours.forward_sequences(seqs)):
        torch.testing.assert_close(logits, _hf_logits(hf, seq), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 3e-2), (torch.bfloat16, 2e-1)])
def test_half_precision_close_to_float64_reference(dtype, atol, tmp_path):
    hf = save_tiny_model(CONFIGS["llama-gqa-tied"], tmp_path).double()
    ours = load_model(tmp_path, dtype=dtype, device="cpu")
    assert next(ours.parameters()).dtype == dtype
    seq = torch.randint(0, VOCAB, (24,))
    got = ours.forward_sequences([seq])[0].double()
    torch.testing.assert_close(got, _hf_logits(hf, seq), atol=atol, rtol=0)


def test_loader_names_the_missing_file(tmp_path):
    with pytest.raises(ModelFolderError, match="config.json is missing"):
        load_model(tmp_path)
    save_tiny_model(CONFIGS["llama-gqa-tied"], tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="model.safetensors is missing"):
        load_model(tmp_path)


def test_loader_rejects_wrong_shapes_and_unsupported_configs(tmp_path):
    import json

    save_tiny_model(CONFIGS["llama-gqa-tied"], tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 90}))
    with pytest.raises(ModelFolderError, match=r"mlp.*shape \(\d+, \d+\), config.json implies"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"model_type": "gpt2"}))
    with pytest.raises(ModelFolderError, match="model_type 'gpt2' is not supported"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"rope_parameters": {"rope_type": "yarn", "factor": 2}}))
    with pytest.raises(ModelFolderError, match="rope_type 'yarn' is not supported"):
        load_model(tmp_path)


@pytest.mark.parametrize("version", [3, 0, None, "1"])
def test_loader_refuses_a_manifest_of_another_format_version(version, tmp_path):
    save_tiny_model(CONFIGS["llama-gqa-tied"], tmp_path)
    manifest = {"method": "svd", "modules": {}} | ({} if version is None else {"format_version": version})
    (tmp_path / "lowrank.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match=rf"format_version {version!r}; this lowrank-engine reads versions 1 and 2"):
        load_model(tmp_path)
