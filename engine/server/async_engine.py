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

from engine.core.workers import WorkerLost
from engine.llm import LLM
from engine.outputs import RequestOutput, StreamDelta
from engine.sampling_params import SamplingParams

from .metrics import Metrics


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "delta", "done" (with the final output) or "error"
    delta: StreamDelta | None = None
    output: RequestOutput | None = None
    message: str = ""
    status: int = 500  # an error's HTTP status: 500 for a failure of ours, 503 when shutdown cut the request


@dataclass(eq=False)
class _Listener:
    """One handler's request, as the engine thread knows it. The handler holds it from the moment it
    posts the add, so it can abort by this handle before it has learnt the engine's request id."""

    deliver: Callable[[Event], None]
    submitted: float
    request_id: int | None = None  # set on the engine thread when the add is accepted


class EngineClosed(Exception):
    """The engine takes no more requests: the server is shutting down (answered with a 503)."""


SHUTTING_DOWN = "the server is shutting down; the request was aborted"


class AsyncEngine:
    def __init__(self, llm: LLM, metrics: Metrics | None = None):
        self.llm = llm
        self.metrics = metrics or Metrics()
        self._update_gauges()  # the cache's size is known before the first request
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._listeners: dict[int, _Listener] = {}
        self._stop = threading.Event()
        self._closed: str | None = None  # close()'s message, once closed
        self._exit_lock = threading.Lock()  # an add is either queued before the thread exits, or refused
        self._exited = False
        self._thread = threading.Thread(target=self._run, name="lowrank-engine", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def close(self, message: str = SHUTTING_DOWN) -> None:
        """Abort every request in flight with a 503 `message` event, and refuse new ones: the end of a
        server's grace period. Safe to call from any thread, more than once."""
        self._commands.put(("close", message))

    def shutdown(self) -> None:
        """Close (anything still running is aborted and told why), then stop the thread. Joined, so the
        process never exits with the thread inside torch (glibc then aborts: "terminate called ...")."""
        self.close()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=120)  # one engine step, however long its prefill

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- handlers' side --------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Event]:
        """Events of one request until its "done" (or "error"); leaving early, even before the engine
        has accepted the request, aborts it."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        accepted: asyncio.Future[None] = loop.create_future()

        def post(callback: Callable[[], None]) -> None:
            try:
                loop.call_soon_threadsafe(callback)
            except RuntimeError:  # that handler's event loop is closed: nobody is listening
                pass

        def deliver(event: Event) -> None:
            post(lambda: events.put_nowait(event))

        def answer(error: Exception | None) -> None:
            def settle() -> None:
                if not accepted.done():
                    accepted.set_exception(error) if error else accepted.set_result(None)
            post(settle)

        listener = _Listener(deliver, time.perf_counter())
        with self._exit_lock:
            if self._exited:
                raise EngineClosed(self._closed or "the engine has stopped")
            self._commands.put(("add", listener, prompt_ids, params, answer))
        finished = False
        try:
            # Inside the try: a handler cancelled while the engine is mid-step (the add not yet
            # answered) still sends the abort, which the engine applies right after the add.
            await accepted  # a rejected request raises its ValueError (EngineClosed once closed) here
            while True:
                event = await events.get()
                finished = event.kind != "delta"
                yield event
                if finished:
                    return
        finally:
            if not finished:  # the client went away (or the handler failed): free the blocks
                self._commands.put(("abort", listener))

    # -- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                self._drain_commands(block=not self.llm.has_unfinished())
                if self.llm.has_unfinished():
                    try:
                        self._step()
                    except WorkerLost as exc:  # a tensor-parallel rank died: the engine ends, saying why
                        print(f"engine: {exc}", file=sys.stderr)
                        self._closed = str(exc)
                        return
                    except Exception:  # the batch's forward pass failed: no single request is to blame
                        traceback.print_exc(file=sys.stderr)
                        self._fail_all("internal error while generating; the request was aborted")
                elif self._stop.is_set():
                    return
        except BaseException:  # a bug outside any one request: logged; the thread ends, the server answers 503s
            traceback.print_exc(file=sys.stderr)
            self._closed = "the engine stopped after an internal error"
        finally:  # however the thread ends, no handler waits on it: refuse the adds still queued
            with self._exit_lock:
                self._exited = True
            self._closed = self._closed or SHUTTING_DOWN
            self._refuse_queued()
            self._fail_all(self._closed, status=503)

    def _refuse_queued(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                command[-1](EngineClosed(self._closed))

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
        try:
            self._apply_one(command)
        except Exception:  # a bug in one command's handling: that handler is told, the thread goes on
            traceback.print_exc(file=sys.stderr)
            if command[0] == "add":
                _, listener, *_, answer = command
                self._listeners.pop(listener.request_id, None)
                if listener.request_id is not None:
                    self.llm.abort(listener.request_id)
                answer(RuntimeError("internal error while adding the request"))

    def _apply_one(self, command: tuple) -> None:
        if command[0] == "add":
            _, listener, prompt_ids, params, answer = command
            if self._closed is not None:
                answer(EngineClosed(self._closed))
                return
            try:
                listener.request_id = self.llm.add_request(prompt_ids, params)
            except ValueError as exc:
                answer(exc)
                return
            self._listeners[listener.request_id] = listener
            self.metrics.prompt_tokens += len(prompt_ids) * params.n
            answer(None)
        elif command[0] == "abort":
            listener = command[1]
            if listener.request_id is not None and self._listeners.get(listener.request_id) is listener:
                del self._listeners[listener.request_id]
                self.llm.abort(listener.request_id)
                self._update_gauges()
        elif command[0] == "close":
            self._closed = command[1]
            self._fail_all(command[1], status=503)

    def _step(self) -> None:
        finished: dict[int, None] = {}  # request ids in order, each once: n > 1 completions can end together
        for request_id, delta in self.llm.step_deltas():
            listener = self._listeners.get(request_id)
            if listener is None:
                continue
            try:
                listener.deliver(Event("delta", delta=delta))
                self.metrics.generation_tokens += len(delta.token_ids)
                if delta.finish_reason is not None and self.llm.is_finished(request_id):
                    finished[request_id] = None
            except Exception:
                self._fail_one(request_id)
        for request_id in finished:
            if request_id not in self._listeners:
                continue  # failed above
            try:
                output = self.llm.pop_output(request_id)
                listener = self._listeners.pop(request_id)
                listener.deliver(Event("done", output=output))
                self._observe(output, time.perf_counter() - listener.submitted)
            except Exception:
                self._fail_one(request_id)
        self._update_gauges()

    def _fail_one(self, request_id: int) -> None:
        """A failure in one request's own bookkeeping: that request gets the error, the batch goes on."""
        traceback.print_exc(file=sys.stderr)
        listener = self._listeners.pop(request_id, None)
        self.llm.abort(request_id)
        if listener is not None:
            listener.deliver(Event("error", message="internal error while handling this request; it was aborted"))

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

    def _fail_all(self, message: str, status: int = 500) -> None:
        for request_id, listener in list(self._listeners.items()):
            listener.deliver(Event("error", message=message, status=status))
            self.llm.abort(request_id)
        self._listeners.clear()
        self._update_gauges()
