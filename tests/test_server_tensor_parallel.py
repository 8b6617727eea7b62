"""`lowrank serve --tensor-parallel-size 2` as a real uvicorn process through the openai client: the
same completions as one process, and a worker that dies ends the engine with 503s that say why."""

import os
import signal
from pathlib import Path

import openai
import pytest

from server_harness import _server_logs_on_failure, get, spawn, tiny_dir  # noqa: F401 (fixtures)

ARGS = ("--served-model-name", "tiny", "--max-model-len", "128", "--kv-cache-memory", str(4 << 20))
PROMPTS = ["t5 t7 t9", "t20 t21 t22 t23 t24 t25"]


def _completions(server) -> list[str]:
    with openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=60) as client:
        return [client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text
                for p in PROMPTS]


def _workers(pid: int) -> list[int]:
    """The server's tensor-parallel worker processes (its multiprocessing children but the resource tracker)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [c for c in children if "resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes().decode()]


def test_two_ranks_serve_what_one_does_and_a_dead_worker_ends_the_engine(tiny_dir, spawn):  # noqa: F811
    one = spawn(tiny_dir, *ARGS)
    expected = _completions(one)
    one.stop()
    two = spawn(tiny_dir, *ARGS, "--tensor-parallel-size", "2", startup_s=120)
    assert _completions(two) == expected
    (worker,) = _workers(two.proc.pid)
    os.kill(worker, signal.SIGKILL)
    with openai.OpenAI(base_url=two.url, api_key="x", max_retries=0, timeout=60) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert caught.value.status_code == 503
    assert "tensor-parallel worker rank 1 (exit code -9) died" in caught.value.message
    assert get(two.port, "/health")[0] == 503
    assert two.stop() == 0
