"""The outermost middleware: a request id for every request, an access log line, request metrics.

The id is the client's `X-Request-Id` when it is sane (short, plain characters), else a new one;
it is returned in the `X-Request-Id` response header and set in `logs.request_id_var`, so every
log line of the request names it. It also holds the request's routing context
(api/routing_hints.py): the `X-Session-Id` it came with, and the `X-Pensieve-Replica` that
answered it in a cluster. The access line has method, path, status and duration - never
the body, the query string or headers.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pensieve.api.middleware.metrics import Metrics
from pensieve.api.routing_hints import (
    REPLICA_HEADER_B,
    RequestRouting,
    routing_var,
    session_from_headers,
)
from pensieve.logs import request_id_var

log = logging.getLogger("pensieve.http")

HEADER_B = b"x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_from(scope: Scope) -> str:
    for key, value in scope["headers"]:
        if key.lower() == HEADER_B:
            text: str = value.decode("latin-1")
            if _SANE_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_from(scope)
        token = request_id_var.set(rid)
        routing = RequestRouting(session_from_headers(scope["headers"]))
        routing_token = routing_var.set(routing)
        started = time.perf_counter()
        status = 500  # if the app fails before starting a response, uvicorn answers 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [h for h in message.get("headers", []) if h[0].lower() != HEADER_B]
                headers.append((HEADER_B, rid.encode()))
                if routing.replica is not None:
                    headers.append((REPLICA_HEADER_B, routing.replica.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, status, time.perf_counter() - started)
            routing_var.reset(routing_token)
            request_id_var.reset(token)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.labels(scope["method"], path, str(status)).inc()
        self.metrics.request_seconds.labels(path).observe(seconds)
        path_text = scope["path"] if scope["path"].isprintable() else repr(scope["path"])
        log.info("%s %s %d %.1f ms", scope["method"], path_text, status, seconds * 1000)
