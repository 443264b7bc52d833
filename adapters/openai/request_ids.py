"""vLLM's request ids over HTTP. A request's X-Request-Id header (else its body's `request_id`) names
its completion: the response's id is "chatcmpl-{id}" / "cmpl-{id}". With --enable-request-id-headers
every response carries X-Request-Id back (the request's, else a fresh one).

Clients reuse ids (a retry, one id per conversation), so a client's id never becomes an engine request
id as it is: each engine request gets a random suffix (as vLLM does), and two concurrent requests with
the same X-Request-Id never share engine state (pages, outputs, aborts)."""

from __future__ import annotations

import uuid
from typing import Any, Optional

REQUEST_ID_HEADER = "x-request-id"


def response_id(prefix: str, raw_request: Any, body_request_id: Optional[str]) -> str:
    """f"{prefix}-{id}": the X-Request-Id header's, else the body's request_id, else a fresh one.
    `raw_request`: the Starlette request (None where there is no HTTP request)."""
    given = raw_request.headers.get(REQUEST_ID_HEADER) if raw_request is not None else None
    return f"{prefix}-{given or body_request_id or uuid.uuid4().hex}"


def engine_request_id(response_id: str, index: int, count: int) -> str:
    """The engine's id of prompt `index` of the `count` one response runs: unique whatever id the
    client chose."""
    base = response_id if count == 1 else f"{response_id}-{index}"
    return f"{base}-{uuid.uuid4().hex[:8]}"


class RequestIdHeaderMiddleware:
    """--enable-request-id-headers: pure ASGI (BaseHTTPMiddleware would break streaming and disconnect
    detection), so that streamed responses and errors answered by other middleware carry it too."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode())
        value = given or uuid.uuid4().hex.encode()

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", value)]}
            await send(message)

        await self.app(scope, receive, send_with_id)
