"""The HTTP side of answers: streamed responses that release their engine requests however they
end, non-streamed work that stops when the client leaves, and the wire framings."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = b"data: [DONE]\n\n"
NDJSON = "application/x-ndjson"


class ReleasingStreamingResponse(StreamingResponse):
    """A streamed answer that releases its engine requests as the response ends, however it ends.

    Starlette does not close the body iterator when the client goes away while a chunk is being
    sent, and never starts it when the client went away before the first chunk. Either way the
    engine requests would only be aborted when garbage collection finalized their generators,
    which in a long-running server can take minutes of wasted decoding. `release` runs instead.
    """

    def __init__(self, content: AsyncIterator[bytes], release: Callable[[], Awaitable[None]],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self._release()


def event_stream(content: AsyncIterator[bytes],
                 release: Callable[[], Awaitable[None]]) -> ReleasingStreamingResponse:
    """Server-sent events (OpenAI, Anthropic)."""
    return ReleasingStreamingResponse(content, release, media_type="text/event-stream",
                                      headers=SSE_HEADERS)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client disconnects first (non-streaming responses)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise asyncio.CancelledError("client disconnected")
        return task.result()
    finally:
        watcher.cancel()
        if not task.done():  # this handler itself was cancelled (shutdown): stop the work too
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def dumps(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def sse(payload: dict[str, Any]) -> bytes:
    return f"data: {dumps(payload)}\n\n".encode()


def sse_event(kind: str, payload: dict[str, Any]) -> bytes:
    """A named event whose data carries its type too (Anthropic's framing)."""
    return f"event: {kind}\ndata: {dumps({'type': kind, **payload})}\n\n".encode()


def ndjson(payload: dict[str, Any]) -> bytes:
    return f"{dumps(payload)}\n".encode()
