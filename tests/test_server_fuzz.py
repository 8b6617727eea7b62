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
               "--max-sequences-per-request", "9")
    yield s
    s.stop()


def json_values(max_leaves: int = 6):
    scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 200)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
               | st.sampled_from(["", "tiny", "\ud800", "t5 t7", "Infinity", "null"]))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=max_leaves)


EDGES = st.sampled_from([None, True, -1, 0, 2**31, 2**63, 2**64, -2**63 - 1, 2**70, math.inf, -math.inf, math.nan,
                         1e308, "", "\ud800", "t5 \udfff", [], {}, [5, 2**64], [[5], [-1]], ["t5", "\ud800"],
                         [{"type": "image_url"}], "x" * 3000])
WILD = st.one_of(EDGES, EDGES, EDGES, json_values())  # edges first: they are where servers break

words = st.lists(st.sampled_from(["t5", "t7", "t22", "t40", "t3", "t96", "t1", "hello"]), min_size=1,
                 max_size=8).map(" ".join)
# Values a well-behaved client sends: a body built from these alone must be answered 200.
SAMPLING = {
    "max_tokens": st.integers(1, 8),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1),
    "top_k": st.integers(0, 120),
    "min_p": st.floats(0, 1),
    "n": st.integers(1, 3),
    "seed": st.integers(-2**63, 2**63 - 1),
    "stop": st.lists(st.sampled_from(["t5", "t7", "t22 t40"]), max_size=4) | st.sampled_from(["t5"]),
    "stop_token_ids": st.lists(st.integers(0, 96), max_size=5),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "ignore_eos": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "response_format": st.just({"type": "text"}),
    "user": st.text(max_size=8),
}
COMPLETION = {"model": st.just("tiny"), "prompt": words | st.lists(words, min_size=1, max_size=3)
              | st.lists(st.integers(0, 96), min_size=1, max_size=6)} | SAMPLING | {
    "logprobs": st.integers(0, 5), "echo": st.booleans()}
content_part = st.fixed_dictionaries({"type": st.just("text"), "text": words})
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                 "content": words | st.lists(content_part, min_size=1, max_size=2)})
CHAT = {"model": st.just("tiny"), "messages": st.lists(message, min_size=1, max_size=3)} | SAMPLING | {
    "max_completion_tokens": st.integers(1, 8), "logprobs": st.just(True), "top_logprobs": st.integers(0, 5)}
REQUIRED = ("model", "prompt", "messages")
# Fields a client may set wrongly besides the ones above: OpenAI's, vLLM's, and nested ones.
MORE_FIELDS = ["min_tokens", "tools", "tool_choice", "logit_bias", "suffix", "best_of", "modalities", "audio",
               "prediction", "functions", "function_call"]


@st.composite
def bodies(draw, fields: dict):
    """A valid body (the required fields and some others), then up to three fields set to anything,
    removed, or (for chat) one message broken: each example probes a few fields, the rest valid."""
    body = {name: draw(value) for name, value in fields.items()
            if name in REQUIRED or draw(st.booleans())}
    for _ in range(draw(st.integers(0, 3))):
        # The required fields carry the most (prompt text and ids, messages, model): one pick in three.
        name = draw(st.sampled_from([n for n in REQUIRED if n in fields]) | st.sampled_from([*fields, *MORE_FIELDS])
                    | st.sampled_from([*fields, *MORE_FIELDS]))
        if draw(st.integers(0, 5)) == 0:
            body.pop(name, None)
        else:
            body[name] = draw(WILD)
    if "messages" in fields and draw(st.integers(0, 3)) == 0 and isinstance(body.get("messages"), list) \
            and body["messages"]:
        # a new list: `messages` may be one of EDGES' own lists, which an assignment in place would
        # change for every later example (and could make cyclic: a body json.dumps refuses)
        body["messages"] = [draw(st.fixed_dictionaries({}, optional={"role": WILD | st.just("tool"),
                                                                      "content": WILD, "name": WILD})),
                            *body["messages"][1:]]
    return body


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
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def valid_bodies(fields: dict):
    return st.fixed_dictionaries({name: fields[name] for name in REQUIRED if name in fields},
                                 optional={name: value for name, value in fields.items() if name not in REQUIRED})


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(completion=valid_bodies(COMPLETION),
       chat=valid_bodies(CHAT).map(lambda b: b | {"logprobs": True} if "top_logprobs" in b else b))
def test_valid_bodies_are_answered_200(fuzz_server, completion, chat):
    """The fuzz's own baseline: without its wild values every body is one the server must serve."""
    for path, body in [("/v1/completions", completion), ("/v1/chat/completions", chat)]:
        status, content_type, text = post_raw(fuzz_server.port, path, body)
        assert status == 200, (body, text)
        check_answer(status, content_type, text)


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
