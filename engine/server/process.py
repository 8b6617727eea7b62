"""`lowrank serve`'s process: bind the port, load the model, run uvicorn, shut down within a bound.

The port is bound before the model loads, so a busy port or a bad host fails in a second rather
than after the load. On SIGTERM or Ctrl-C uvicorn stops accepting and waits for the open
responses; what is still generating after the grace period is aborted by the engine, and each open
response is told so (a 503, or an error event and `[DONE]` in a stream) before uvicorn's own
timeout would cut it silently. Then the engine thread is joined and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

import uvicorn

from .app import build_app
from .async_engine import AsyncEngine

DEFAULT_SHUTDOWN_GRACE_S = 30.0
TELL_CLIENTS_S = 5.0  # after the grace period: time for the aborted handlers to send their errors


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (a busy port fails here); ValueError naming both when that is
    impossible. Not listening yet: asyncio listens when uvicorn starts, so while the model loads a
    client (or a readiness probe) is refused rather than left hanging in the backlog."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts reuse TIME_WAIT ports
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(model: str | Path, *, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          api_key: str | None = None, dtype: str | None = None, device: str | None = None,
          ratio: float | None = None, shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE_S,
          max_sequences_per_request: int | None = None, **engine_settings) -> None:
    """Load the model, start the engine thread and serve until Ctrl-C / SIGTERM (drains first)."""
    from engine.llm import LLM
    from engine.model.loader import load_tokenizer

    if not shutdown_grace >= 0:
        raise ValueError(f"--shutdown-grace must be >= 0 seconds, got {shutdown_grace}")
    if int(os.environ.get("RANK", "0")) > 0:  # a tensor-parallel rank under torchrun: rank 0 serves HTTP,
        LLM(model, dtype=dtype, device=device, ratio=ratio, **engine_settings)  # this one its steps, then exits
    sock = bind(host, port)
    try:
        llm = LLM(model, dtype=dtype, device=device, ratio=ratio, **engine_settings)
        tokenizer = load_tokenizer(model)  # the HTTP side's own: not shared with the engine thread
        engine = AsyncEngine(llm)
        app = build_app(engine, tokenizer, served_model_name or Path(model).name, llm.max_model_len, api_key,
                        max_sequences_per_request=max_sequences_per_request)
    except BaseException:
        sock.close()
        raise
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=shutdown_grace + TELL_CLIENTS_S)
    # uvicorn drains on SIGTERM / SIGINT, then re-raises the signal to the handler it found: make those
    # no-ops, so a clean shutdown exits 0 (installed only now: a signal while loading still stops the load).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        _BoundedShutdownServer(config, engine, shutdown_grace).run(sockets=[sock])
    finally:
        engine.shutdown()  # a second Ctrl-C skips the app's shutdown: the thread must still stop


class _BoundedShutdownServer(uvicorn.Server):
    """uvicorn's graceful shutdown, bounded: the engine is closed once `grace` seconds have passed."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, grace: float):
        super().__init__(config)
        self.engine, self.grace = engine, grace

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:  # uvicorn says where it listens only for sockets it bound itself
            host, port = sockets[0].getsockname()[:2]
            logging.getLogger("uvicorn.error").info(f"Uvicorn running on http://{host}:{port} (Press CTRL+C to quit)")

    async def shutdown(self, sockets=None) -> None:
        timer = asyncio.get_running_loop().call_later(self.grace, self.engine.close)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
