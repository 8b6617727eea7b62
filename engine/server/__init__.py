"""`lowrank serve`: the engine behind an OpenAI-compatible HTTP API (FastAPI + uvicorn)."""

from __future__ import annotations

import signal
from pathlib import Path

from .app import build_app
from .async_engine import AsyncEngine


def serve(model: str | Path, *, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          api_key: str | None = None, dtype: str | None = None, device: str | None = None,
          ratio: float | None = None, **engine_settings) -> None:
    """Load the model, start the engine thread and serve until Ctrl-C / SIGTERM (drains first)."""
    import uvicorn
    from transformers import AutoTokenizer

    from ..llm import LLM

    llm = LLM(model, dtype=dtype, device=device, ratio=ratio, **engine_settings)
    tokenizer = AutoTokenizer.from_pretrained(model)  # the HTTP side's own: not shared with the engine thread
    name = served_model_name or Path(model).name
    app = build_app(AsyncEngine(llm), tokenizer, name, llm.max_model_len, api_key)
    # uvicorn drains on SIGTERM, then re-raises the signal to the handler it found: make that one a
    # no-op, so a clean shutdown exits 0 (installed only now: a SIGTERM while loading still kills).
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)


__all__ = ["AsyncEngine", "build_app", "serve"]
