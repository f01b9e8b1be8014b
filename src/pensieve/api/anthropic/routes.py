"""Anthropic Messages routes: POST /v1/messages (streamed or not) and /v1/messages/count_tokens.

A stream is the event sequence the SDK expects:

    message_start, content_block_start, ping, content_block_delta..., content_block_stop,
    message_delta (stop_reason, usage), message_stop

`message_start` waits for the first output, so its usage already says how much of the prompt
came from Pensieve's memory (`cache_read_input_tokens`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pensieve.api.anthropic.protocol import CountTokensRequest, MessagesRequest
from pensieve.api.base import parse_body
from pensieve.api.errors import ApiFamily, error_payload
from pensieve.api.generation import (
    Finish,
    Finished,
    Generation,
    TextDelta,
    Usage,
    count_prompt_tokens,
    start,
)
from pensieve.api.streaming import event_stream, sse_event, until_disconnect
from pensieve.errors import PensieveError
from pensieve.runtime import ModelRuntime

router = APIRouter(tags=["anthropic"])

# The one table from a finish to Anthropic's stop_reason.
STOP_REASONS = {Finish.END: "end_turn", Finish.STOP_STRING: "stop_sequence",
                Finish.LENGTH: "max_tokens", Finish.TOOL_CALLS: "tool_use",
                Finish.ABORT: "end_turn", Finish.ERROR: "end_turn"}


def _runtime(request: Request) -> ModelRuntime:
    runtime: ModelRuntime = request.app.state.runtime
    return runtime


@router.post("/v1/messages", response_model=None)
async def messages(request: Request) -> JSONResponse | StreamingResponse:
    body = await parse_body(request, MessagesRequest)
    body.warn_unknown_fields()
    gen = await start(_runtime(request), body.to_generate())
    if body.stream:
        return event_stream(_stream(gen), gen.aclose)
    choice = (await until_disconnect(request, gen.collect()))[0]
    content = [{"type": "text", "text": choice.text}] if choice.text else []
    finish = choice.finish or Finish.END
    return JSONResponse({**_message(gen, content), "stop_reason": STOP_REASONS[finish],
                         "stop_sequence": choice.stop_string, "usage": _usage(gen.usage)})


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> dict[str, int]:
    body = await parse_body(request, CountTokensRequest)
    body.warn_unknown_fields()
    return {"input_tokens": await count_prompt_tokens(_runtime(request), body.count_request())}


def _message(gen: Generation, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": gen.request_id, "type": "message", "role": "assistant", "model": gen.model,
            "content": content}


def _usage(usage: Usage) -> dict[str, int]:
    """Anthropic counts cache reads apart from `input_tokens`; Pensieve writes every prompt to
    its memory as a matter of course, so no tokens are billed as a separate cache write."""
    return {"input_tokens": usage.num_uncached_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": usage.num_cached_tokens,
            "output_tokens": usage.num_output_tokens}


async def _stream(gen: Generation) -> AsyncIterator[bytes]:
    started = False
    try:
        async for event in gen.events():
            if not started:
                started = True
                for chunk in _opening(gen):
                    yield chunk
            if isinstance(event, TextDelta) and event.text:
                yield sse_event("content_block_delta", {
                    "index": 0, "delta": {"type": "text_delta", "text": event.text}})
            elif isinstance(event, Finished):
                for chunk in _closing(gen, event):
                    yield chunk
    except PensieveError as exc:
        yield sse_event("error", error_payload(ApiFamily.ANTHROPIC, exc.status_code,
                                               exc.message))


def _opening(gen: Generation) -> list[bytes]:
    message = {**_message(gen, []), "stop_reason": None, "stop_sequence": None,
               "usage": {**_usage(gen.usage), "output_tokens": 0}}
    return [sse_event("message_start", {"message": message}),
            sse_event("content_block_start", {"index": 0,
                                              "content_block": {"type": "text", "text": ""}}),
            sse_event("ping", {})]


def _closing(gen: Generation, last: Finished) -> list[bytes]:
    return [sse_event("content_block_stop", {"index": 0}),
            sse_event("message_delta", {"delta": {"stop_reason": STOP_REASONS[last.reason],
                                                  "stop_sequence": last.stop_string},
                                        "usage": _usage(gen.usage)}),
            sse_event("message_stop", {})]
