"""One `LLM` driven by its own thread, fed by many asyncio handlers: batching across HTTP requests.

The engine thread owns the LLM (scheduler, cache, its tokenizer): handlers never touch it, they
post commands (add, abort) to a queue and receive their request's events on an asyncio queue,
handed over with `call_soon_threadsafe`. While any request is unfinished the thread steps the
engine, so requests that arrive during a step join the running batch at the next one.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ..llm import LLM
from ..outputs import RequestOutput, StreamDelta
from ..sampling_params import SamplingParams
from .metrics import Metrics


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "delta", "done" (with the final output) or "error"
    delta: StreamDelta | None = None
    output: RequestOutput | None = None
    message: str = ""


@dataclass(eq=False)
class _Listener:
    deliver: Callable[[Event], None]
    submitted: float


class AsyncEngine:
    def __init__(self, llm: LLM, metrics: Metrics | None = None):
        self.llm = llm
        self.metrics = metrics or Metrics()
        self._update_gauges()  # the cache's size is known before the first request
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._listeners: dict[int, _Listener] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lowrank-engine", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """Finish what is in flight, then stop the thread (uvicorn calls this after draining HTTP)."""
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(timeout=60)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- handlers' side --------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Event]:
        """Events of one request until its "done" (or "error"); leaving early aborts the request."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        accepted: asyncio.Future[int] = loop.create_future()

        def deliver(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def answer(request_id: int | None, error: Exception | None) -> None:
            def settle() -> None:
                if not accepted.done():
                    accepted.set_exception(error) if error else accepted.set_result(request_id)
            loop.call_soon_threadsafe(settle)

        self._commands.put(("add", prompt_ids, params, deliver, answer))
        request_id = await accepted  # a rejected request raises its ValueError here
        finished = False
        try:
            while True:
                event = await events.get()
                finished = event.kind != "delta"
                yield event
                if finished:
                    return
        finally:
            if not finished:  # the client went away (or the handler failed): free the blocks
                self._commands.put(("abort", request_id))

    # -- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._drain_commands(block=not self.llm.has_unfinished())
            if self.llm.has_unfinished():
                try:
                    self._step()
                except Exception:  # keep serving: fail the requests in flight, not the process
                    traceback.print_exc(file=sys.stderr)
                    self._fail_all("internal error while generating; the request was aborted")
            elif self._stop.is_set():
                return

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.1) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, prompt_ids, params, deliver, answer = command
            try:
                request_id = self.llm.add_request(prompt_ids, params)
            except ValueError as exc:
                answer(None, exc)
                return
            self._listeners[request_id] = _Listener(deliver, time.perf_counter())
            self.metrics.prompt_tokens += len(prompt_ids) * params.n
            answer(request_id, None)
        elif command[0] == "abort":
            request_id = command[1]
            if self._listeners.pop(request_id, None) is not None:
                self.llm.abort(request_id)
                self._update_gauges()

    def _step(self) -> None:
        finished = []
        for request_id, delta in self.llm.step_deltas():
            listener = self._listeners.get(request_id)
            if listener is None:
                continue
            listener.deliver(Event("delta", delta=delta))
            self.metrics.generation_tokens += len(delta.token_ids)
            if delta.finish_reason is not None and self.llm.is_finished(request_id):
                finished.append(request_id)
        for request_id in finished:
            output = self.llm.pop_output(request_id)
            listener = self._listeners.pop(request_id)
            listener.deliver(Event("done", output=output))
            self._observe(output, time.perf_counter() - listener.submitted)
        self._update_gauges()

    def _observe(self, output: RequestOutput, latency: float) -> None:
        m = self.metrics
        m.request_success += 1
        m.prefix_cache_hits += output.num_cached_tokens
        m.e2e_request_latency_seconds.observe(latency)
        m.time_to_first_token_seconds.observe(output.time_to_first_token)
        if output.decode_tokens_per_second > 0:
            m.time_per_output_token_seconds.observe(1 / output.decode_tokens_per_second)

    def _update_gauges(self) -> None:
        m, scheduler, blocks = self.metrics, self.llm.scheduler, self.llm.block_manager
        m.num_requests_running = len({s.request_id for s in scheduler.running})
        m.num_requests_running_max = max(m.num_requests_running_max, m.num_requests_running)
        m.num_requests_waiting = len({s.request_id for s in scheduler.waiting})
        total = len(blocks.blocks)
        m.kv_cache_usage_perc = (total - blocks.num_free_blocks) / total
        m.kv_cache_blocks = total
        m.kv_cache_bytes_per_token = self.llm.kv_cache_bytes_per_token
        m.num_preemptions = scheduler.num_preemptions

    def _fail_all(self, message: str) -> None:
        for request_id, listener in list(self._listeners.items()):
            listener.deliver(Event("error", message=message))
            self.llm.abort(request_id)
        self._listeners.clear()
        self._update_gauges()
