"""`lowrank serve` as its users see it: the official openai client, raw HTTP for errors, disconnects, batching.

Every server runs as a real subprocess on loopback (what `lowrank serve` ships), on a tiny random
Llama with a word-level tokenizer ("t5 t7" <-> [5, 7]) except one test on the real SmolLM2.
"""

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer, LlamaConfig

from conftest import REPO, save_tiny_model, save_tiny_tokenizer

TINY = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=4096)
# "t1" (EOS) and "t0" (unk) are special tokens, split out of any word: "t11" encodes as [1, 0]. Prompts avoid t1x.
CHAT_TEMPLATE = "{% for m in messages %}t2 {{ m['content'] }} {% endfor %}t3"
MAX_LEN = 128  # the main server's --max-model-len: small, so over-long prompts are cheap to send
LONG_LEN = 4096  # the second server's: room for a generation that outlives a disconnect by seconds
API_KEY = "secret-key"
ERROR_FIELDS = {"message", "type", "param", "code"}
_STARTED: list["Server"] = []  # servers whose new log lines a failing test prints


class Server:
    """`python -m converters.cli serve FOLDER ...` on a free loopback port; stdout+stderr go to a log file."""

    def __init__(self, folder: Path, log: Path, *args: str, startup_s: float = 60.0):
        self.port, self.log = _free_port(), log
        # One thread (CI has two cores); torch kernels, as the HTTP side, not Triton, is under test here.
        env = os.environ | {"OMP_NUM_THREADS": "1", "LOWRANK_KERNELS": "torch"}
        env.pop("TRITON_INTERPRET", None)
        cmd = [sys.executable, "-m", "converters.cli", "serve", str(folder), "--host", "127.0.0.1",
               "--port", str(self.port), "--device", "cpu", *args]
        with open(log, "wb") as sink:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode} while starting:\n{self.log_text()}")
            try:
                if get(self.port, "/health")[0] == 200:
                    _STARTED.append(self)
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        pytest.fail(f"server not healthy after {startup_s} s:\n{self.log_text()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        status, text = get(self.port, "/metrics", raw=True)
        assert status == 200
        return {name: float(value) for name, value in
                (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}

    def stop(self) -> int:
        """SIGTERM; the exit status once it is gone. It must drain and shut the app down, within bounded time."""
        _STARTED.remove(self)
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"server ignored SIGTERM for 45 s:\n{self.log_text()}")
        log = self.log_text()
        assert "Application shutdown complete" in log and "Traceback" not in log, log
        assert code == 0, f"server exited with {code} on SIGTERM:\n{log}"
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self in _STARTED:
            _STARTED.remove(self)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, headers: dict | None = None, raw: bool = False) -> tuple[int, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        body = response.read().decode()
        return response.status, body if raw else json.loads(body)
    finally:
        conn.close()


def post(port: int, path: str, body: dict | bytes, headers: dict | None = None, raw: bool = False
         ) -> tuple[int, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, data, {"Content-Type": "application/json"} | (headers or {}))
        response = conn.getresponse()
        text = response.read().decode()
        return response.status, text if raw else json.loads(text)
    finally:
        conn.close()


def assert_error(status: int, body: dict, expected_status: int, param: str | None = None) -> dict:
    """OpenAI's error shape, exactly: clients read error.message / error.param, never FastAPI's `detail`."""
    assert status == expected_status, body
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), body
    assert error["code"] == expected_status and error["param"] == param, body
    return error


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_model(TINY, folder)
    save_tiny_tokenizer(folder, TINY.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE  # transformers 5 saves it as chat_template.jinja
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    s = Server(tiny_dir, tmp_path_factory.mktemp("logs") / "main.log", "--served-model-name", "tiny",
               "--max-model-len", str(MAX_LEN), "--kv-cache-memory", str(4 << 20))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed_server(tiny_dir, tmp_path_factory):
    """API key, long context; only the batching test sends it concurrent requests: its running peak means something."""
    s = Server(tiny_dir, tmp_path_factory.mktemp("logs") / "keyed.log", "--served-model-name", "tiny",
               "--api-key", API_KEY, "--max-model-len", str(LONG_LEN), "--kv-cache-memory", str(8 << 20))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture
def spawn(tmp_path):
    """Start servers inside a test; any the test did not stop (it failed first) is killed, never leaked."""
    started = []

    def start(folder: Path, *args: str, startup_s: float = 60.0) -> Server:
        started.append(Server(folder, tmp_path / f"server{len(started)}.log", *args, startup_s=startup_s))
        return started[-1]

    yield start
    for s in started:
        s.kill()


@pytest.fixture(autouse=True)
def _server_logs_on_failure():
    """Print what each server logged during the test: pytest shows it only when the test fails."""
    marks = {id(s): s.log.stat().st_size for s in _STARTED}
    yield
    for s in list(_STARTED):
        text = s.log.read_bytes()[marks.get(id(s), 0):].decode(errors="replace")
        print(f"--- {s.log.name} (port {s.port}) during this test ---\n{text}")


def greedy(client, prompt, max_tokens: int = 12, **kw) -> str:
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                    extra_body={"ignore_eos": True}, **kw)
    return out.choices[0].text


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
