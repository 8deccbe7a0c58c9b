"""Limits that keep one client from exhausting the server: body size and concurrent generations."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from starlette.exceptions import HTTPException

from server.errors import APIError

DEFAULT_MAX_BODY_BYTES = 4 << 20  # ~1M tokens of text: more than any context this server serves
DEFAULT_MAX_CONCURRENT_REQUESTS = 256


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server accepts ({limit} bytes).",
                    code="request_too_large")


class BodySizeLimit:
    """ASGI middleware: refuse a body over `max_bytes` with a 413, before it is all read.

    A declared Content-Length is checked up front; a chunked body is counted as it arrives, and the
    413 is raised as an HTTPException, the one kind FastAPI passes through from body reading
    (anything else it turns into a generic 400).
    """

    def __init__(self, app, max_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await body_too_large(self.max_bytes).response()(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, body_too_large(self.max_bytes).message)
            return message

        await self.app(scope, counting_receive, send)


class Slot:
    """One admitted generation. Released explicitly when it ends, or when it is garbage-collected,
    so a response dropped before it ever ran cannot leak its slot."""

    def __init__(self, gate: AdmissionGate):
        self._finalizer = weakref.finalize(self, gate._leave)

    def release(self) -> None:
        self._finalizer()  # runs at most once


class AdmissionGate:
    """At most `limit` generations at once; beyond that a clear 503 with Retry-After, instead of a
    queue that grows until every client times out."""

    def __init__(self, limit: int = DEFAULT_MAX_CONCURRENT_REQUESTS):
        self.limit = limit
        self.active = 0

    def admit(self) -> Slot:
        if self.active >= self.limit:
            raise APIError(503, f"The server is at its limit of {self.limit} concurrent requests; retry shortly.",
                           type="server_error", code="server_overloaded", headers={"Retry-After": "1"})
        self.active += 1
        return Slot(self)

    def _leave(self) -> None:
        self.active -= 1
