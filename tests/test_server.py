"""`lowrank serve` through the official openai client: completions, chat, streaming, seeds, stops,
logprobs, echo; and one chat on the real SmolLM2 (tests/server_harness.py runs the servers)."""

import http.client
import json

import openai
import pytest

from server_harness import (  # noqa: F401 (pytest finds fixtures by name, their dependencies too)
    greedy,
    tiny_dir, tokenizer, server, keyed_server, client, spawn, _server_logs_on_failure,
)


# -- through the official client ---------------------------------------------------------------

def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_text_and_usage(client, tokenizer):
    """This prompt's greedy text meets EOS after 5 tokens; ignore_eos (an extra_body field) must go past it."""
    prompt = "t70 t7"
    stopped = client.completions.create(model="tiny", prompt=prompt, max_tokens=7, temperature=0)
    assert (stopped.choices[0].finish_reason, stopped.usage.completion_tokens) == ("stop", 5)
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=7, temperature=0,
                                    extra_body={"ignore_eos": True})
    (choice,) = out.choices
    assert choice.text.startswith(stopped.choices[0].text) and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"]) == 2
    assert (out.usage.completion_tokens, out.usage.total_tokens) == (7, 9)


def test_two_prompts_with_n_2_give_four_choices_in_prompt_order(client):
    """Choice i*n+j is prompt i's j-th completion: greedy makes both of a prompt's copies its own text."""
    prompts = ["t5 t7", "t40 t41 t42"]
    alone = [greedy(client, p, 6) for p in prompts]
    assert alone[0] != alone[1]
    out = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    texts = {c.index: c.text for c in out.choices}
    assert [texts[i] for i in range(4)] == [alone[0], alone[0], alone[1], alone[1]]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (5, 24)


def test_chat_reply_goes_through_the_chat_template(client):
    """The reply equals the completion of the templated prompt, so the template was applied."""
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "t5 t7"}],
                                         max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    (choice,) = out.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.message.content == greedy(client, "t2 t5 t7 t3", 6)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (4, 6)


def test_streaming_chat_joins_to_the_plain_reply_and_ends_with_usage(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "t8 t9 t20"}], max_tokens=10, temperature=0,
              extra_body={"ignore_eos": True})
    expected = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_completion_joins_to_the_plain_text(client):
    expected = greedy(client, "t20 t21", 10)
    stream = client.completions.create(model="tiny", prompt="t20 t21", max_tokens=10, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert len(chunks) > 1  # streamed, not sent as one piece
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stream_is_server_sent_events_ending_in_done(server):
    """Raw framing: every event is `data: <json>`, the last `data: [DONE]` (clients stop on it)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "t3 t4", "max_tokens": 5,
                                                        "stream": True}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = [e for e in response.read().decode().split("\n\n") if e]
    conn.close()
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") and "choices" in json.loads(e[6:]) for e in events[:-1])


def test_seed_makes_sampling_reproducible(client):
    def sample(seed: int) -> str:
        return client.completions.create(model="tiny", prompt="t5 t6", max_tokens=24, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stop_string_cuts_the_text_before_it(client):
    full = greedy(client, "t5 t7 t9", 24)
    # A later word whose first occurrence is its own (not inside an earlier "t21" for "t2").
    words = full.split()
    stop = next((w for k, w in enumerate(words[2:], 2) if full.find(w) == len(" ".join(words[:k])) + 1), None)
    assert stop is not None, f"no usable stop word in {full!r}"
    out = client.completions.create(model="tiny", prompt="t5 t7 t9", max_tokens=24, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == full[: full.find(stop)]
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens < 24


def test_completion_logprobs(client):
    out = client.completions.create(model="tiny", prompt="t5 t7", max_tokens=5, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens == 5
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and value <= 0
        assert top[token] == value == max(top.values())  # greedy: the chosen token is the most likely


def test_chat_logprobs(client):
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "t5"}], max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=2,
                                         extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 5
    assert "".join(t.token for t in content) == out.choices[0].message.content.replace(" ", "")
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 2  # OpenAI: exactly top_logprobs alternatives, best first
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the best


def test_echo_prefixes_the_prompt(client):
    out = client.completions.create(model="tiny", prompt="t5 t7", max_tokens=4, temperature=0, echo=True,
                                    extra_body={"ignore_eos": True})
    text = out.choices[0].text
    assert text.startswith("t5 t7") and text != "t5 t7"
    assert text == "t5 t7" + greedy(client, "t5 t7", 4)



# -- the real model -----------------------------------------------------------------------

@pytest.mark.real_model
def test_real_model_answers_a_chat_question(real_model_dir, spawn):
    s = spawn(real_model_dir, "--max-model-len", "512", "--kv-cache-memory", str(64 << 20), startup_s=120)
    with openai.OpenAI(base_url=s.url, api_key="x", max_retries=0, timeout=120) as c:
        name = c.models.list().data[0].id
        out = c.chat.completions.create(model=name, max_tokens=16, temperature=0,
                                        messages=[{"role": "user", "content": "What is the capital of France?"}])
    s.stop()
    assert name == real_model_dir.name
    assert "Paris" in out.choices[0].message.content
