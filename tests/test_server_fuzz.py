"""Fuzzed request bodies (hypothesis) against a real `lowrank serve`: never a 5xx, every error in
OpenAI's shape, every 200 well-formed (a stream ends in [DONE]), and the server healthy and idle
afterwards. Fields are OpenAI's and vLLM's, each given a plausible value or any JSON at all."""

import http.client
import json
import math
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from server_harness import (  # noqa: F401 (pytest finds fixtures by name, their dependencies too)
    ERROR_FIELDS, Server, get,
    tiny_dir, tokenizer, _server_logs_on_failure,
)

FUZZ_LEN = 64  # --max-model-len: whatever a body asks, no request can run long


@pytest.fixture(scope="module")
def fuzz_server(tiny_dir, tmp_path_factory):
    s = Server(tiny_dir, tmp_path_factory.mktemp("logs") / "fuzz.log", "--served-model-name", "tiny",
               "--max-model-len", str(FUZZ_LEN), "--kv-cache-memory", str(4 << 20),
               "--max-sequences-per-request", "8")
    yield s
    s.stop()


def json_values(max_leaves: int = 6):
    scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 200)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
               | st.sampled_from(["", "tiny", "\ud800", "t5 t7", "Infinity", "null"]))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=max_leaves)


def field(plausible):
    """Mostly a value a client might send, sometimes anything."""
    return st.one_of(plausible, plausible, json_values())


words = st.lists(st.sampled_from(["t5", "t7", "t22", "t40", "t3", "t96", "t1", "hello", "\ud800"]),
                 max_size=8).map(" ".join)
SAMPLING = {
    "model": field(st.just("tiny")),
    "max_tokens": field(st.integers(0, 8) | st.none()),
    "temperature": field(st.floats(-1, 3) | st.sampled_from([0, 1, math.inf])),
    "top_p": field(st.floats(-0.5, 1.5)),
    "top_k": field(st.integers(-2, 120)),
    "min_p": field(st.floats(-0.5, 1.5)),
    "n": field(st.integers(0, 10)),
    "seed": field(st.integers(-2**64, 2**64)),
    "stop": field(st.lists(st.sampled_from(["t5", "t7", "", "\ud800"]), max_size=6) | st.text(max_size=4)),
    "stop_token_ids": field(st.lists(st.integers(-2, 120), max_size=5)),
    "presence_penalty": field(st.floats(-3, 3)),
    "frequency_penalty": field(st.floats(-3, 3)),
    "repetition_penalty": field(st.floats(-1, 3)),
    "min_tokens": field(st.integers(-1, 10)),
    "ignore_eos": field(st.booleans()),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "logit_bias": field(st.just({})),
    "response_format": field(st.sampled_from([{"type": "text"}, {"type": "json_object"}])),
    "tools": field(st.just([])),
    "user": json_values(),
}
COMPLETION = SAMPLING | {
    "prompt": field(words | st.lists(words, max_size=3) | st.lists(st.integers(-5, 120), max_size=6)
                    | st.lists(st.lists(st.integers(0, 96), max_size=4), max_size=3)),
    "logprobs": field(st.integers(-1, 7)),
    "echo": field(st.booleans()),
    "suffix": field(st.just("")),
    "best_of": field(st.integers(0, 3)),
}
content_part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": words})
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "robot"])},
                                optional={"content": field(words | st.lists(content_part, max_size=3))})
CHAT = SAMPLING | {
    "messages": field(st.lists(message, min_size=0, max_size=3)),
    "max_completion_tokens": field(st.integers(0, 8)),
    "logprobs": field(st.booleans()),
    "top_logprobs": field(st.integers(-1, 25)),
}


def bodies(fields: dict):
    """Any subset of the fields (the required ones usually present), with their values."""
    return st.fixed_dictionaries({}, optional=fields)


def post_raw(port: int, path: str, body: dict) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.getheader("content-type", ""), response.read().decode()
    finally:
        conn.close()


def check_answer(status: int, content_type: str, text: str) -> None:
    assert status < 500, text
    if status != 200:
        body = json.loads(text)
        assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
        assert body["error"]["code"] == status and body["error"]["message"], body
        return
    if content_type.startswith("text/event-stream"):
        events = [e for e in text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]", events[-3:]
        for e in events[:-1]:
            chunk = json.loads(e.removeprefix("data: "))
            assert "choices" in chunk or "error" in chunk, chunk
            assert "error" not in chunk or chunk["error"]["code"] < 500, chunk
    else:
        assert "choices" in json.loads(text)


# FUZZ_EXAMPLES=5000 for a longer hunt than CI's.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@FUZZ
@given(body=bodies(COMPLETION))
def test_fuzzed_completions_never_5xx(fuzz_server, body):
    check_answer(*post_raw(fuzz_server.port, "/v1/completions", body))


@FUZZ
@given(body=bodies(CHAT))
def test_fuzzed_chats_never_5xx(fuzz_server, body):
    check_answer(*post_raw(fuzz_server.port, "/v1/chat/completions", body))


@FUZZ
@given(body=st.one_of(json_values(12), st.binary(max_size=64).map(lambda b: b.decode("latin-1"))))
def test_fuzzed_non_objects_never_5xx(fuzz_server, body):
    """Not even an object: a list, a number, a stray string as the whole body."""
    for path in ("/v1/completions", "/v1/chat/completions"):
        check_answer(*post_raw(fuzz_server.port, path, body))


def test_after_the_fuzz_the_server_is_healthy_and_idle(fuzz_server):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = fuzz_server.metrics()
        if (m["lowrank:num_requests_running"], m["lowrank:num_requests_waiting"],
                m["lowrank:kv_cache_usage_perc"]) == (0, 0, 0.0):
            break
        time.sleep(0.05)
    assert get(fuzz_server.port, "/health") == (200, {"status": "ok"})
    assert (m["lowrank:num_requests_running"], m["lowrank:num_requests_waiting"],
            m["lowrank:kv_cache_usage_perc"]) == (0, 0, 0.0), m
    log = fuzz_server.log_text()
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]
