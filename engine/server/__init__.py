"""`lowrank serve`: the engine behind an OpenAI-compatible HTTP API (FastAPI + uvicorn)."""

from __future__ import annotations

from .app import build_app
from .async_engine import AsyncEngine
from .process import serve

__all__ = ["AsyncEngine", "build_app", "serve"]
