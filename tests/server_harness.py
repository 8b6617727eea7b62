"""A real `lowrank serve` subprocess on loopback for the server tests, with raw-HTTP helpers and fixtures.

Every server runs a tiny random Llama with a word-level tokenizer ("t5 t7" <-> [5, 7]); test
modules import the fixtures they use from here.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer, LlamaConfig

from conftest import REPO, save_tiny_model, save_tiny_tokenizer

TINY = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=4096)
# "t1" (EOS) and "t0" (unk) are special tokens, split out of any word: "t11" encodes as [1, 0]. Prompts avoid t1x.
# Like real templates (Llama 2, Mistral, Gemma), it refuses some messages with raise_exception().
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool messages') }}"
                 "{% endif %}t2 {{ m['content'] }} {% endfor %}t3")
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
        env = os.environ | {"OMP_NUM_THREADS": "1", "LOWRANK_KERNELS": "auto"}
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
