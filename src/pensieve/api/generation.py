"""API-independent helpers for running engine requests from an HTTP handler."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pensieve.engine.client import EngineClient
from pensieve.engine.types import EngineRequest, RequestAccepted, SeqOutput, TokenLogprob

T = TypeVar("T")


@dataclass(slots=True)
class Generation:
    """A started request: its prompt was accepted; outputs follow from `outputs`."""

    num_prompt_tokens: int
    outputs: AsyncIterator[SeqOutput]
    offset: int = 0  # choice index offset when several prompts share one response


async def start(client: EngineClient, request: EngineRequest, offset: int = 0) -> Generation:
    """Submit and wait until the worker has accepted (or rejected: raises) the request."""
    stream = client.generate(request)
    try:
        first = await anext(stream)
    except BaseException:
        await stream.aclose()
        raise
    assert isinstance(first, RequestAccepted)
    return Generation(first.num_prompt_tokens, stream, offset)  # type: ignore[arg-type]


async def start_all(client: EngineClient, requests: list[EngineRequest],
                    n: int) -> list[Generation]:
    gens: list[Generation] = []
    try:
        for i, req in enumerate(requests):
            gens.append(await start(client, req, offset=i * n))
    except BaseException:
        await close_all(gens)
        raise
    return gens


async def close_all(gens: list[Generation]) -> None:
    """Stop these generations now; the worker aborts those not finished."""
    for g in gens:
        await g.outputs.aclose()  # type: ignore[attr-defined]


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


async def merged(gens: list[Generation]) -> AsyncIterator[SeqOutput]:
    """Outputs of several generations as they come, with choice indexes made unique."""
    if len(gens) == 1:
        g = gens[0]
        async for out in g.outputs:
            yield out
        return
    queue: asyncio.Queue[SeqOutput | BaseException | None] = asyncio.Queue()

    async def pump(g: Generation) -> None:
        try:
            async for out in g.outputs:
                out.index += g.offset
                queue.put_nowait(out)
        except Exception as exc:  # surfaced to the consumer below
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(g)) for g in gens]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(slots=True)
class TokenCounts:
    """Usage numbers gathered from the outputs as they pass."""

    output: dict[tuple[str, int], int] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)

    def observe(self, out: SeqOutput) -> None:
        self.output[(out.request_id, out.index)] = out.num_output_tokens
        self.cached[out.request_id] = out.num_cached_tokens

    @property
    def num_output(self) -> int:
        return sum(self.output.values())

    @property
    def num_cached(self) -> int:
        return sum(self.cached.values())


@dataclass(slots=True)
class Collected:
    texts: list[str]
    finish_reasons: list[str | None]
    logprobs: list[list[TokenLogprob]]
    counts: TokenCounts = field(default_factory=TokenCounts)


async def collect(outputs: AsyncIterator[SeqOutput], num_choices: int) -> Collected:
    result = Collected([""] * num_choices, [None] * num_choices,
                       [[] for _ in range(num_choices)])
    async for out in outputs:
        i = out.index
        result.texts[i] += out.text
        result.counts.observe(out)
        if out.logprobs:
            result.logprobs[i].extend(out.logprobs)
        if out.finish_reason is not None:
            result.finish_reasons[i] = str(out.finish_reason)
    return result


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


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
