"""The OpenAI-compatible HTTP API over one `AsyncEngine`: models, completions, chat, health, metrics.

The routes and the error mapping live here: every failure is answered in OpenAI's error shape
with the right status. The request gate (API key, body size) is `guard.py`; the completion and
chat handlers, which tokenize, check and stream, are `handlers.py`.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.prompts import PromptError
from engine.sampling_params import shown

from .async_engine import AsyncEngine
from .guard import Guard
from .handlers import Handlers
from .protocol import APIError, ChatRequest, CompletionRequest

MAX_BODY_BYTES = 8 << 20
DEFAULT_MAX_SEQUENCES_PER_REQUEST = 256  # prompts x n: four full batches at the default max_num_seqs
UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def build_app(engine: AsyncEngine, tokenizer, served_model_name: str, max_model_len: int,
              api_key: str | None = None, max_sequences_per_request: int | None = None) -> FastAPI:
    """The app; the engine thread starts with the app and stops (after draining) when it shuts down.

    `max_sequences_per_request` caps prompts x n of one request (default 256), so one request
    cannot queue more work than the batch holds several times over and slow everyone else.
    """
    cap = DEFAULT_MAX_SEQUENCES_PER_REQUEST if max_sequences_per_request is None else max_sequences_per_request
    if not isinstance(cap, int) or cap < 1:
        raise ValueError(f"max_sequences_per_request must be a positive integer, got {cap!r}")
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if not engine.alive:
            engine.start()
        yield
        # After uvicorn has drained the open responses; in a worker thread, so the event loop stays
        # free for any handler still finishing (the join waits out the engine's current step).
        await asyncio.to_thread(engine.shutdown)
        api.close()

    app = FastAPI(title="lowrank-engine", lifespan=lifespan)
    api = Handlers(engine, tokenizer, served_model_name, max_model_len, cap)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(PromptError)
    async def _bad_prompt(_: Request, exc: PromptError):
        return APIError(400, str(exc), exc.param).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception):
        traceback.print_exception(exc, file=sys.stderr)  # the operator sees it; the client never does
        return APIError(500, "internal server error").response()

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=MAX_BODY_BYTES)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": api.created,
                                            "owned_by": "lowrank-engine", "max_model_len": max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await api.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        return await api.chat(body, request)

    return app


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 as OpenAI's 400: `param` names the field, the message quotes the value."""
    error = exc.errors()[0]
    if error.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}")
    loc = []
    for part in error.get("loc", ())[1:] if error.get("loc", ("",))[0] == "body" else error.get("loc", ()):
        if isinstance(part, str) and (part in UNION_TAGS or "[" in part or "-" in part):
            break  # pydantic names the union member it tried ("str", "list[int]"): not a field
        loc.append(str(part))
    param = ".".join(loc) or None
    got = f" (got {shown(error['input'])})" if "input" in error and loc else ""
    return APIError(400, f"{param or 'body'}: {error['msg']}{got}", param=param)


