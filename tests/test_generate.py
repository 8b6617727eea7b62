"""Reference decoding: greedy equals transformers' generate; sampling is seeded; bad input is refused."""

import pytest
import torch
from transformers import Qwen2Config

from conftest import save_tiny_model
from converters.cli import main
from engine import load_model
from engine.eval.reference_decoding import stream_tokens

CONFIG = Qwen2Config(vocab_size=83, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None)


@pytest.fixture
def tiny(tmp_path):
    hf = save_tiny_model(CONFIG, tmp_path)
    return hf, load_model(tmp_path, device="cpu")


def test_greedy_equals_transformers_generate(tiny):
    hf, ours = tiny
    prompt = torch.randint(0, 83, (9,))
    expected = hf.generate(prompt[None], max_new_tokens=12, do_sample=False, min_new_tokens=12,
                           attention_mask=torch.ones(1, 9, dtype=torch.long))[0, 9:].tolist()
    assert list(stream_tokens(ours, prompt.tolist(), 12)) == expected


def test_sampling_is_reproducible_per_seed_and_stops_on_stop_ids(tiny):
    _, ours = tiny
    prompt = [5, 6, 7]
    a = list(stream_tokens(ours, prompt, 20, temperature=1.5, seed=3))
    assert a == list(stream_tokens(ours, prompt, 20, temperature=1.5, seed=3))
    assert a != list(stream_tokens(ours, prompt, 20, temperature=1.5, seed=4))
    stopped = list(stream_tokens(ours, prompt, 20, temperature=1.5, seed=3, stop_ids=(a[4],)))
    assert stopped == a[: a.index(a[4]) + 1]


@pytest.mark.parametrize("prompt, kw, message", [
    ([], {}, "prompt is empty"),
    ([1, 83], {}, r"token ids must be in \[0, 83\)"),
    ([1], {"temperature": -1.0}, "temperature must be >= 0"),
    ([1], {"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
])
def test_bad_input_is_refused(tiny, prompt, kw, message):
    _, ours = tiny
    with pytest.raises(ValueError, match=message):
        next(stream_tokens(ours, prompt, **({"max_new_tokens": 4} | kw)))


def test_generate_cli_chat_reply_on_the_real_model(real_model_dir, capsys, cpu_kernels):
    assert main(["generate", str(real_model_dir), "--chat", "--max-tokens", "12", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out
