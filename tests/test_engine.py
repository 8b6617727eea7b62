"""The batched engine on the real SmolLM2 (fp32, CPU): exactness against transformers, caching,
preemption, seeds, stops, logprobs, streaming and bad input."""

import pytest
import torch

from engine import LLM, SamplingParams

# The subject here is the engine, not the kernels (tests/test_paged_decode.py runs the engine on
# them): interpreted Triton would make each real-model decode step take seconds.
pytestmark = pytest.mark.usefixtures("cpu_kernels")

PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "import numpy as np\nimport",
    "Once upon a time, in a land far away, there lived a",
    "Q: What is 2 + 2?\nA:",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):",
    "Python",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
]
NEW_TOKENS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
SMALL = {"max_model_len": 512, "kv_cache_memory": 64 << 20}  # 89 blocks: plenty for these tests


@pytest.fixture(scope="module")
def llm(real_model_dir):
    return LLM(real_model_dir, dtype="float32", device="cpu", **SMALL)


@pytest.fixture(scope="module")
def hf_greedy(real_model_dir, llm):
    """transformers' own greedy `generate`, one prompt at a time (no padding to blur the comparison)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    expected = []
    for prompt in PROMPTS:
        ids = torch.tensor([llm.encode(prompt)])
        out = hf.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        expected.append(out[0, ids.shape[1]:].tolist())
    return expected


def test_batched_greedy_equals_transformers_generate(llm, hf_greedy):
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outputs] == hf_greedy
    assert all(o.finish_reason == "length" and o.prompt == p for o, p in zip(outputs, PROMPTS))


def test_a_batch_gives_each_prompt_its_own_tokens(llm, hf_greedy):
    alone = [llm.generate(p, GREEDY, use_tqdm=False)[0].token_ids for p in PROMPTS[:3]]
    assert alone == hf_greedy[:3]


def test_chunked_prefill_and_forced_preemption_keep_the_tokens(real_model_dir, hf_greedy):
    # 12 blocks of 16 tokens for 8 sequences of up to ~45 tokens: they cannot all be resident.
    tight = LLM(real_model_dir, dtype="float32", device="cpu", max_model_len=64, kv_cache_memory=12 * 16 * 46080,
                max_num_batched_tokens=24, enable_prefix_caching=False)
    outputs = tight.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert tight.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outputs] == hf_greedy
    assert tight.block_manager.num_free_blocks == 12  # everything released


def test_prefix_cache_hit_skips_prefill_and_changes_nothing(real_model_dir):
    shared = "You are a helpful assistant who writes clean, well documented Python code. " * 3
    prompts = [shared + "Write a function that reverses a string.", shared + "Write a function that sums a list."]
    results = {}
    for caching in (True, False):
        engine = LLM(real_model_dir, dtype="float32", device="cpu", enable_prefix_caching=caching, **SMALL)
        first = engine.generate(prompts[0], GREEDY, use_tqdm=False)[0]
        second = engine.generate(prompts[1], GREEDY, use_tqdm=False)[0]
        results[caching] = (first, second)
    (hit_first, hit_second), (miss_first, miss_second) = results[True], results[False]
    assert hit_first.num_cached_tokens == 0 and miss_second.num_cached_tokens == 0
    assert hit_second.num_cached_tokens >= 32  # the shared prompt's full blocks came from the cache
    assert (hit_first.token_ids, hit_second.token_ids) == (miss_first.token_ids, miss_second.token_ids)


def test_a_prompt_entirely_in_the_prefix_cache(llm, hf_greedy):
    prompt = llm.encode(PROMPTS[5])[:32]  # exactly two blocks
    first = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    again = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 16  # the block holding the last token is always recomputed
    assert again.token_ids == first.token_ids


def test_seeded_sampling_is_reproducible_and_independent_of_neighbours(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=12, seed=7, ignore_eos=True)
    alone = llm.generate(PROMPTS[3], params, use_tqdm=False)[0].token_ids
    neighbours = [SamplingParams(temperature=1.2, max_tokens=5, seed=s) for s in range(3)]
    crowded = llm.generate([PROMPTS[3], *PROMPTS[:3]], [params, *neighbours], use_tqdm=False)[0].token_ids
    other_seed = llm.generate(PROMPTS[3], SamplingParams(temperature=0.9, top_p=0.95, max_tokens=12, seed=8,
                                                         ignore_eos=True), use_tqdm=False)[0].token_ids
    assert alone == crowded
    assert alone != other_seed


def test_stop_string_cuts_the_text_exactly(llm):
    full = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0]
    stop = full.text[8:12]  # a string the greedy output contains
    start = full.text.find(stop)
    cut = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, stop=stop), use_tqdm=False)[0]
    assert cut.text == full.text[:start]
    assert cut.finish_reason == "stop"


def test_stop_token_id_and_eos(llm):
    full = llm.generate(PROMPTS[1], GREEDY, use_tqdm=False)[0]
    stop_id = full.token_ids[5]
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0]
    assert out.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1] and out.finish_reason == "stop"


def test_logprobs_equal_log_softmax_of_the_reference_logits(llm):
    prompt = llm.encode(PROMPTS[4])
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, logprobs=3), use_tqdm=False)[0]
    completion = out.outputs[0]
    reference = llm.model.forward_sequences([prompt + out.token_ids])[0].double().log_softmax(-1)
    for i, (token, entry) in enumerate(zip(out.token_ids, completion.logprobs)):
        row = reference[len(prompt) - 1 + i]
        assert next(iter(entry)) == token
        top = row.topk(3)
        expected = {token: row[token].item()} | dict(zip(top.indices.tolist(), top.values.tolist()))
        assert entry.keys() == expected.keys()
        for t, value in entry.items():
            assert value == pytest.approx(expected[t], abs=1e-4)
    assert completion.cumulative_logprob == pytest.approx(sum(e[t] for e, t in zip(completion.logprobs, out.token_ids)))


def test_stream_deltas_add_up_to_the_generated_text(llm):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    deltas = list(llm.stream(PROMPTS[2], params))
    final = llm.generate(PROMPTS[2], params, use_tqdm=False)[0]
    assert "".join(d.text for d in deltas) == final.text
    assert [t for d in deltas for t in d.token_ids] == final.token_ids
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])


def test_abandoned_stream_releases_its_blocks(llm):
    free = llm.block_manager.num_free_blocks
    stream = llm.stream(PROMPTS[3], SamplingParams(temperature=0, max_tokens=40))
    next(stream)
    stream.close()
    assert not llm.has_unfinished()
    assert llm.block_manager.num_free_blocks == free


def test_chat_applies_the_template(llm):
    reply = llm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(temperature=0, max_tokens=8),
                     use_tqdm=False)[0]
    expected = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=False,
                                                 add_generation_prompt=True)
    assert reply.prompt_token_ids == llm.tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert reply.text


def test_n_completions_share_the_prompt(llm):
    prompt = PROMPTS[3] + " " + PROMPTS[3]  # two full blocks to share
    params = SamplingParams(temperature=1.5, max_tokens=8, n=3, seed=1, ignore_eos=True)
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    assert len(out.outputs) == 3 and len({tuple(c.token_ids) for c in out.outputs}) == 3
    single = SamplingParams(temperature=1.5, max_tokens=8, seed=1, ignore_eos=True)
    assert out.outputs[0].token_ids == llm.generate(prompt, single, use_tqdm=False)[0].token_ids


@pytest.mark.parametrize("prompt, params, message", [
    ("", None, "prompt is empty"),
    ([], None, "prompt is empty"),
    ([1, 2, 10**9], None, "token ids must be in"),
    ("x " * 600, None, "maximum context length is 512 tokens"),
    ("hi", "not params", "must be a SamplingParams"),
])
def test_bad_requests_raise_and_the_engine_keeps_serving(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.add_request(prompt, params)
    assert llm.generate("Python", SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0].token_ids


def test_a_bad_prompt_in_a_batch_schedules_nothing(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(["fine", ""], GREEDY, use_tqdm=False)
    assert not llm.has_unfinished()


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
                                          ("min_p", 2.0), ("max_tokens", 0), ("n", 0), ("logprobs", 50)])
def test_invalid_sampling_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_unknown_engine_setting_is_named(real_model_dir):
    with pytest.raises(ValueError, match="unknown engine setting.*max_batch"):
        LLM(real_model_dir, max_batch=4)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ValueError, match="not a model folder|config.json"):
        LLM(tmp_path)
