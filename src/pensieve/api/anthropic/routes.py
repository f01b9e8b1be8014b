"""Anthropic Messages routes: POST /v1/messages (streamed or not) and /v1/messages/count_tokens.

A stream is the event sequence the SDK expects:

    message_start, content_block_start, ping, content_block_delta..., content_block_stop,
    message_delta (stop_reason, usage), message_stop

`message_start` waits for the first output, so its usage already says how much of the prompt
came from Pensieve's memory (`cache_read_input_tokens`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pensieve.api.anthropic.protocol import CountTokensRequest, MessagesRequest
from pensieve.api.base import parse_body
from pensieve.api.chat import Delta, TextGeneration, Usage, count_prompt_tokens, start_text
from pensieve.api.errors import ApiFamily, error_payload
from pensieve.api.generation import ReleasingStreamingResponse, until_disconnect
from pensieve.engine.types import FinishReason
from pensieve.errors import PensieveError
from pensieve.runtime import ModelRuntime

router = APIRouter(tags=["anthropic"])

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _runtime(request: Request) -> ModelRuntime:
    return request.app.state.runtime


@router.post("/v1/messages", response_model=None)
async def messages(request: Request) -> JSONResponse | StreamingResponse:
    body = await parse_body(request, MessagesRequest)
    body.warn_unknown_fields()
    served = _runtime(request).get(body.model)
    gen = await start_text(served, body.to_text_request(served.defaults), id_prefix="msg_")
    if body.stream:
        return ReleasingStreamingResponse(_stream(gen), gen.aclose,
                                          media_type="text/event-stream", headers=_SSE_HEADERS)
    completion = await until_disconnect(request, gen.collect())
    content = [{"type": "text", "text": completion.text}] if completion.text else []
    stop_reason, stop_sequence = _stop(completion.finish_reason, completion.stop_string)
    return JSONResponse({**_message(gen, content), "stop_reason": stop_reason,
                         "stop_sequence": stop_sequence, "usage": _usage(gen.usage)})


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> dict[str, int]:
    body = await parse_body(request, CountTokensRequest)
    body.warn_unknown_fields()
    served = _runtime(request).get(body.model)
    messages_, prefill = body.chat_messages()
    return {"input_tokens": await count_prompt_tokens(served, messages_, prefill)}


def _message(gen: TextGeneration, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": gen.request_id, "type": "message", "role": "assistant", "model": gen.model,
            "content": content}


def _usage(usage: Usage) -> dict[str, int]:
    """Anthropic counts cache reads apart from `input_tokens`; Pensieve writes every prompt to
    its memory as a matter of course, so no tokens are billed as a separate cache write."""
    return {"input_tokens": usage.num_uncached_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": usage.num_cached_tokens,
            "output_tokens": usage.num_output_tokens}


def _stop(reason: FinishReason | None, stop_string: str | None) -> tuple[str, str | None]:
    if stop_string is not None:
        return "stop_sequence", stop_string
    if reason is FinishReason.LENGTH:
        return "max_tokens", None
    return "end_turn", None


async def _stream(gen: TextGeneration) -> AsyncIterator[bytes]:
    started = False
    try:
        async for delta in gen.deltas():
            if not started:
                started = True
                for event in _opening(gen):
                    yield event
            if delta.text:
                yield _event("content_block_delta", {
                    "index": 0, "delta": {"type": "text_delta", "text": delta.text}})
            if delta.finish_reason is not None:
                for event in _closing(gen, delta):
                    yield event
    except PensieveError as exc:
        yield _event("error", error_payload(ApiFamily.ANTHROPIC, exc.status_code, exc.message))


def _opening(gen: TextGeneration) -> list[bytes]:
    message = {**_message(gen, []), "stop_reason": None, "stop_sequence": None,
               "usage": {**_usage(gen.usage), "output_tokens": 0}}
    return [_event("message_start", {"message": message}),
            _event("content_block_start", {"index": 0,
                                           "content_block": {"type": "text", "text": ""}}),
            _event("ping", {})]


def _closing(gen: TextGeneration, last: Delta) -> list[bytes]:
    stop_reason, stop_sequence = _stop(last.finish_reason, last.stop_string)
    return [_event("content_block_stop", {"index": 0}),
            _event("message_delta", {"delta": {"stop_reason": stop_reason,
                                               "stop_sequence": stop_sequence},
                                     "usage": _usage(gen.usage)}),
            _event("message_stop", {})]


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    data = json.dumps({"type": kind, **payload}, ensure_ascii=False)
    return f"event: {kind}\ndata: {data}\n\n".encode()
