"""Transport limits: header and body size, body read time, and a header-read deadline.

The body is read here, before any route runs, with a byte budget and a deadline: an oversized
body gets a 413 without being buffered, and a client that trickles its body (slowloris) gets a
408 instead of holding a connection forever. The route then reads the buffered copy.

uvicorn's h11 protocol limits the size of the request head (`h11_max_incomplete_event_size`) but
not the time a client may take to send it; `guarded_h11_protocol` adds that deadline.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from pensieve.api.errors import error_response

log = logging.getLogger("pensieve.limits")

STREAMED_BODY_PREFIX = "/api/blobs/"  # Ollama's blob uploads: no size cap, streamed to disk


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_body_bytes: int = 8 << 20
    max_header_bytes: int = 16 << 10
    read_timeout_s: float = 30.0


class _BodyError(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class BodyLimitMiddleware:
    """Reads each request body within `max_body_bytes` and `read_timeout_s`, then replays it."""

    def __init__(self, app: ASGIApp, config: LimitsConfig):
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > self.config.max_header_bytes:
            # h11 enforces this only on heads that arrive in several reads; this catches the rest.
            exc = _BodyError(431, f"The request headers are larger than the limit of "
                             f"{self.config.max_header_bytes} bytes.", "headers_too_large")
            await _refuse(scope, receive, send, exc)
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith(STREAMED_BODY_PREFIX):
            # A model upload: gigabytes, written to disk as it arrives by the route itself
            # (which checks its digest and format); buffering it here would hold it in RAM.
            await self.app(scope, receive, send)
            return
        try:
            self._check_length(scope)
            async with asyncio.timeout(self.config.read_timeout_s):
                body = await self._read(receive)
        except _BodyError as exc:
            await _refuse(scope, receive, send, exc)
            return
        except TimeoutError:
            late = _BodyError(408, f"The request body was not received within "
                              f"{self.config.read_timeout_s:g} s.", "request_timeout")
            await _refuse(scope, receive, send, late)
            return
        if body is None:  # the client left while sending
            return
        await self.app(scope, _replay(body, receive), send)

    def _check_length(self, scope: Scope) -> None:
        for key, value in scope["headers"]:
            if key.lower() == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise _BodyError(400, "The Content-Length header is not a number.",
                                     "invalid_content_length") from None
                if length > self.config.max_body_bytes:
                    raise self._too_large()

    async def _read(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.config.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> _BodyError:
        return _BodyError(413, f"The request body is larger than the limit of "
                          f"{self.config.max_body_bytes} bytes.", "request_too_large")


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later: http.disconnect, which routes watch for

    return replay


async def _refuse(scope: Scope, receive: Receive, send: Send, exc: _BodyError) -> None:
    log.warning("refused %s %s: %s", scope["method"], scope["path"], exc.code)
    response = error_response(scope["path"], exc.status, exc.message, code=exc.code,
                              headers={"Connection": "close"})
    await response(scope, receive, send)


def guarded_h11_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections that take too long to send a request head."""

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # noqa: ANN401 - asyncio.Transport
            super().connection_made(transport)
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and self.conn.their_state is h11.IDLE:
                self._arm_head_timer()  # the first bytes of a next request on a kept-alive line
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            self._head_timer = self.loop.call_later(header_timeout_s, self._on_head_timeout)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _on_head_timeout(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closing a connection that sent no complete request head in %g s",
                         header_timeout_s)
                self.transport.close()

    return GuardedH11Protocol
