"""The request gate, before routing and body parsing: the API key, then the body size (ASGI)."""

from __future__ import annotations

import hmac

from .protocol import APIError

PUBLIC_PATHS = ("/health", "/metrics")  # the load balancer's and Prometheus' probes: no key


class Guard:
    """ASGI middleware, before routing and body parsing: the API key on every route but the probes
    (/health, /metrics), then the body size.

    The size is checked on Content-Length or, for chunked uploads that have none, on the bytes
    as they arrive: such a body is read here, up to the limit, and replayed to the app.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.limit = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"] not in PUBLIC_PATHS and \
                not self._authorized(headers.get("authorization", "")):
            return await _reply(scope, receive, send, APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'"))
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _reply(scope, receive, send, APIError(
                413, f"request body of {length} bytes is over the limit of {self.limit} bytes"))
        if length is not None:
            return await self.app(scope, receive, send)
        # No Content-Length (chunked upload): read it here, up to the limit, then replay it.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _reply(scope, receive, send, APIError(
                    413, f"request body is over the limit of {self.limit} bytes"))
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # what follows the body: the disconnect a handler may wait for
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    def _authorized(self, header: str) -> bool:
        """RFC 9110: the scheme is case-insensitive; the key is compared in constant time."""
        scheme, _, credentials = header.strip().partition(" ")
        # Headers arrive as bytes, decoded as latin-1 above: back to those bytes, against the key's UTF-8.
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode("latin-1"),
                                                                  self.api_key.encode())


async def _reply(scope, receive, send, error: APIError) -> None:
    await error.response()(scope, receive, send)
