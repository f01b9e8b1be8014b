"""A streamed answer releases its engine requests however the response ends: finished, client
gone mid-stream, or client gone before the first chunk (when Starlette never starts the body)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from pensieve.api.streaming import ReleasingStreamingResponse

SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "method": "POST",
         "path": "/v1/chat/completions", "headers": []}


class Body:
    """A body iterator that records how far it got and whether it was closed."""

    def __init__(self, num_chunks: int) -> None:
        self.num_chunks = num_chunks
        self.num_sent = 0
        self.started = self.closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        try:
            for _ in range(self.num_chunks):
                self.num_sent += 1
                yield b"data: x\n\n"
                await asyncio.sleep(0.01)
        finally:
            self.closed = True


async def _serve(body: Body, hang_up_after: int | None) -> tuple[int, list[dict]]:
    releases: list[int] = []
    sent: list[dict] = []
    gone = asyncio.Event()

    async def release() -> None:
        releases.append(body.num_sent)

    async def receive() -> dict:
        if hang_up_after != 0:
            await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        chunks = sum(1 for m in sent if m.get("body"))
        if hang_up_after is not None and chunks >= hang_up_after:
            gone.set()
        await asyncio.sleep(0)

    response = ReleasingStreamingResponse(body.chunks(), release, media_type="text/event-stream")
    await response(SCOPE, receive, send)
    assert len(releases) == 1  # released exactly once
    return releases[0], sent


@pytest.mark.parametrize("hang_up_after", [None, 3, 0], ids=["finished", "mid-stream",
                                                            "before-the-first-chunk"])
def test_the_requests_are_released_however_the_response_ends(hang_up_after: int | None) -> None:
    body = Body(num_chunks=50)
    num_sent_at_release, sent = asyncio.run(_serve(body, hang_up_after))
    if hang_up_after is None:
        assert num_sent_at_release == 50 and sent[-1] == {"type": "http.response.body",
                                                          "body": b"", "more_body": False}
    else:
        assert num_sent_at_release < 50
    assert body.closed or not body.started
