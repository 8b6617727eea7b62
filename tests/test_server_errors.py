"""`lowrank serve` at its edges: errors in OpenAI's shape, the API key, disconnects, batching of
concurrent streams, and SIGTERM (tests/server_harness.py runs the servers)."""

import asyncio
import http.client
import json
import threading
import time

import openai
import pytest

from server_harness import (  # noqa: F401 (pytest finds fixtures by name, their dependencies too)
    MAX_LEN, LONG_LEN, API_KEY, Server, get, post, assert_error,
    tiny_dir, tokenizer, server, keyed_server, client, spawn, _server_logs_on_failure,
)


# -- raw HTTP: errors in OpenAI's shape ---------------------------------------------------------

COMPLETION = {"model": "tiny", "prompt": "t5 t7", "max_tokens": 2}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "t5"}], "max_tokens": 2}


@pytest.mark.parametrize("path, body, param, value", [
    ("/v1/completions", COMPLETION | {"temperature": -1}, "temperature", "-1"),
    ("/v1/completions", COMPLETION | {"top_p": 2}, "top_p", "2"),
    ("/v1/completions", COMPLETION | {"n": 0}, "n", "0"),
    ("/v1/completions", COMPLETION | {"max_tokens": "abc"}, "max_tokens", "abc"),
    ("/v1/completions", COMPLETION | {"max_tokens": 0}, "max_tokens", "0"),
    ("/v1/completions", COMPLETION | {"logprobs": 9}, "logprobs", "9"),
    ("/v1/completions", {"model": "tiny"}, "prompt", None),
    ("/v1/completions", COMPLETION | {"prompt": 5}, "prompt", "5"),
    ("/v1/chat/completions", {"model": "tiny"}, "messages", None),
    ("/v1/chat/completions", CHAT | {"messages": "hi"}, "messages", "hi"),
    ("/v1/chat/completions", CHAT | {"top_p": 0}, "top_p", "0"),
    ("/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": 30}, "top_logprobs", "30"),
])
def test_invalid_field_is_a_400_naming_field_and_value(server, path, body, param, value):
    error = assert_error(*post(server.port, path, body), 400, param)
    assert value is None or value in error["message"]


def test_malformed_json_is_a_400(server):
    assert_error(*post(server.port, "/v1/completions", b'{"model": "tiny", "prompt": '), 400)


def test_prompt_over_the_context_is_a_400_quoting_both_lengths(server):
    body = COMPLETION | {"prompt": " ".join(["t5"] * (MAX_LEN + 1))}
    message = assert_error(*post(server.port, "/v1/completions", body), 400, "prompt")["message"]
    assert str(MAX_LEN) in message and str(MAX_LEN + 1) in message


def test_completion_that_would_overflow_the_context_is_a_400(server):
    body = COMPLETION | {"prompt": " ".join(["t5"] * 100), "max_tokens": 50}
    message = assert_error(*post(server.port, "/v1/completions", body), 400, "prompt")["message"]
    assert all(str(n) in message for n in (MAX_LEN, 100, 50))


@pytest.mark.parametrize("path, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_unknown_model_is_a_404_on_param_model(server, path, body):
    error = assert_error(*post(server.port, path, body | {"model": "gpt-4"}), 404, "model")
    assert "gpt-4" in error["message"]


def test_unknown_fields_are_ignored(server):
    status, body = post(server.port, "/v1/completions", COMPLETION | {"user": "me", "suffix_of_the_future": [1]})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1


def test_oversize_body_is_a_413(server):
    """Refused on Content-Length alone, before the 9 MiB would be read."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(9 << 20))
    conn.endheaders(b"{")
    response = conn.getresponse()
    status, body = response.status, json.loads(response.read())
    conn.close()
    assert "bytes" in assert_error(status, body, 413)["message"]


def test_oversize_chunked_body_is_a_413(server):
    body = json.dumps(COMPLETION | {"pad": "x" * (9 << 20)}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", (body[i:i + (1 << 16)] for i in range(0, len(body), 1 << 16)),
                 {"Content-Type": "application/json"}, encode_chunked=True)
    response = conn.getresponse()
    status, answer = response.status, json.loads(response.read())
    conn.close()
    assert_error(status, answer, 413)


def test_unknown_route_is_a_404_in_the_error_shape(server):
    assert_error(*get(server.port, "/v1/nothing-here"), 404)


def test_streamed_request_the_engine_rejects_is_still_a_400(server):
    status, text = post(server.port, "/v1/completions", COMPLETION | {"prompt": [5, 500], "stream": True}, raw=True)
    assert status == 400, text
    assert_error(status, json.loads(text), 400, "prompt")


def test_engine_rejection_is_a_400(server):
    error = assert_error(*post(server.port, "/v1/completions", COMPLETION | {"prompt": [5, 500]}), 400, "prompt")
    assert "500" in error["message"]


# -- API key --------------------------------------------------------------------------------

@pytest.mark.parametrize("headers, status", [
    ({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": API_KEY}, 401),
    ({"Authorization": f"Bearer {API_KEY}"}, 200),
])
def test_api_key_is_required_on_v1_routes(keyed_server, headers, status):
    got = get(keyed_server.port, "/v1/models", headers)
    if status == 200:
        assert got[0] == 200 and got[1]["data"][0]["id"] == "tiny"
    else:
        assert_error(*got, 401)
        assert_error(*post(keyed_server.port, "/v1/completions", COMPLETION, headers), 401)


def test_health_and_metrics_need_no_key(keyed_server):
    assert get(keyed_server.port, "/health") == (200, {"status": "ok"})
    assert "lowrank:num_requests_running" in keyed_server.metrics()


def test_official_client_with_the_key(keyed_server):
    with openai.OpenAI(base_url=keyed_server.url, api_key=API_KEY, max_retries=0) as c:
        assert c.completions.create(model="tiny", prompt="t5", max_tokens=2).usage.prompt_tokens == 1
    with openai.OpenAI(base_url=keyed_server.url, api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.models.list()


# -- disconnects and batching ---------------------------------------------------------------

def wait_for_idle(server: Server, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert get(server.port, "/health")[0] == 200
        m = server.metrics()
        if m["lowrank:num_requests_running"] == 0 and m["lowrank:kv_cache_usage_perc"] == 0.0:
            return m
        time.sleep(0.1)
    pytest.fail(f"server still busy after {timeout} s: {m}")


def test_client_disconnect_aborts_a_streaming_request(keyed_server):
    """Close the socket after two chunks: the request must stop and free its blocks, not run to max_tokens."""
    max_tokens = LONG_LEN - 8  # thousands of steps: seconds of work if the abort were missing
    before = wait_for_idle(keyed_server)
    conn = http.client.HTTPConnection("127.0.0.1", keyed_server.port, timeout=30)
    body = {"model": "tiny", "prompt": "t5 t7", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    response = conn.getresponse()
    assert response.status == 200
    chunks = 0
    while chunks < 2:
        line = response.fp.readline()
        assert line, "stream ended early"
        chunks += line.startswith(b"data: {")
    assert keyed_server.metrics()["lowrank:num_requests_running"] == 1
    response.close()
    conn.close()
    after = wait_for_idle(keyed_server)
    generated = after["lowrank:generation_tokens_total"] - before["lowrank:generation_tokens_total"]
    assert 2 <= generated < max_tokens // 2, generated
    assert after["lowrank:request_success_total"] == before["lowrank:request_success_total"]


def test_client_disconnect_aborts_a_plain_request(keyed_server):
    """The non-streamed path watches for the disconnect too (no write would reveal it)."""
    max_tokens = LONG_LEN - 8
    before = wait_for_idle(keyed_server)
    conn = http.client.HTTPConnection("127.0.0.1", keyed_server.port, timeout=30)
    body = {"model": "tiny", "prompt": "t5 t7", "max_tokens": max_tokens, "ignore_eos": True}
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    deadline = time.monotonic() + 10
    while keyed_server.metrics()["lowrank:num_requests_running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    conn.close()
    after = wait_for_idle(keyed_server)
    generated = after["lowrank:generation_tokens_total"] - before["lowrank:generation_tokens_total"]
    assert 1 <= generated < max_tokens // 2, generated
    assert after["lowrank:request_success_total"] == before["lowrank:request_success_total"]


def test_32_concurrent_streams_are_batched_and_match_their_solo_runs(keyed_server):
    """Greedy text must not depend on what shares the batch; the running peak shows they did share it."""
    prompts = [f"t{20 + i} t{60 + i % 30} t{i % 7 + 3}" for i in range(32)]
    kw = dict(model="tiny", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    with openai.OpenAI(base_url=keyed_server.url, api_key=API_KEY, max_retries=0, timeout=60) as c:
        solo = [c.completions.create(prompt=p, **kw).choices[0].text for p in prompts]
    assert keyed_server.metrics()["lowrank:num_requests_running_max"] <= 1  # nothing concurrent so far

    async def one(c: openai.AsyncOpenAI, prompt: str) -> str:
        parts = [chunk.choices[0].text async for chunk in await c.completions.create(prompt=prompt, stream=True, **kw)]
        return "".join(parts)

    async def all_at_once() -> list[str]:
        async with openai.AsyncOpenAI(base_url=keyed_server.url, api_key=API_KEY, max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    assert asyncio.run(all_at_once()) == solo
    assert keyed_server.metrics()["lowrank:num_requests_running_max"] > 1


# -- shutdown -------------------------------------------------------------------------------

LONG_SERVER = ("--served-model-name", "tiny", "--max-model-len", str(LONG_LEN), "--kv-cache-memory", str(8 << 20))


def test_sigterm_drains_the_request_in_flight(tiny_dir, spawn):
    """A deploy's SIGTERM must not cut a request short: it completes in full, then the server exits."""
    s = spawn(tiny_dir, *LONG_SERVER)
    result: dict = {}
    body = COMPLETION | {"max_tokens": 1500, "ignore_eos": True}
    thread = threading.Thread(target=lambda: result.update(answer=post(s.port, "/v1/completions", body)))
    thread.start()
    deadline = time.monotonic() + 10
    while s.metrics()["lowrank:num_requests_running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert s.metrics()["lowrank:generation_tokens_total"] < 1500  # still generating when the signal lands
    s.stop()
    thread.join(timeout=60)
    status, answer = result["answer"]
    assert status == 200 and answer["usage"]["completion_tokens"] == 1500
    assert answer["choices"][0]["finish_reason"] == "length"


def test_sigterm_exits_0(tiny_dir, spawn):
    assert spawn(tiny_dir, *LONG_SERVER).stop() == 0
