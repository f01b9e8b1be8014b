"""Anthropic Messages routes: POST /v1/messages (streamed or not) and /v1/messages/count_tokens.

A stream is the event sequence the SDK expects, one content block after another (thinking,
text, then a tool_use block per call, each closed before the next starts):

    message_start, content_block_start, ping, content_block_delta..., content_block_stop,
    [content_block_start, content_block_delta..., content_block_stop]...,
    message_delta (stop_reason, usage), message_stop

Deltas: `text_delta`, `thinking_delta` (then an empty `signature_delta`: Pensieve does not sign
reasoning), and `input_json_delta` with a call's arguments as the model generates them.

`message_start` waits for the first output, so its usage already says how much of the prompt
came from Pensieve's memory (`cache_read_input_tokens`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pensieve.api.anthropic.content import anthropic_id
from pensieve.api.anthropic.protocol import CountTokensRequest, MessagesRequest
from pensieve.api.base import parse_body
from pensieve.api.errors import ApiFamily, error_payload
from pensieve.api.generation import (
    Choice,
    Event,
    Finish,
    Finished,
    Generation,
    ReasoningDelta,
    TextDelta,
    ToolArgsDelta,
    ToolCallEvent,
    ToolCallStart,
    Usage,
    count_prompt_tokens,
    start,
)
from pensieve.api.streaming import event_stream, sse_event, until_disconnect
from pensieve.api.tools import arguments_object
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
    finish = choice.finish or Finish.END
    return JSONResponse({**_message(gen, _content(choice)), "stop_reason": STOP_REASONS[finish],
                         "stop_sequence": choice.stop_string, "usage": _usage(gen.usage)})


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> dict[str, int]:
    body = await parse_body(request, CountTokensRequest)
    body.warn_unknown_fields()
    return {"input_tokens": await count_prompt_tokens(_runtime(request), body.count_request())}


def _message(gen: Generation, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": gen.request_id, "type": "message", "role": "assistant", "model": gen.model,
            "content": content}


def _content(choice: Choice) -> list[dict[str, Any]]:
    """A whole reply's blocks: thinking, text, then the tool calls."""
    blocks: list[dict[str, Any]] = []
    if choice.reasoning:
        blocks.append(_thinking_block(choice.reasoning))
    if choice.text:
        blocks.append({"type": "text", "text": choice.text})
    blocks.extend(_tool_use_block(c.id, c.name, arguments_object(c.arguments))
                  for c in choice.tool_calls)
    return blocks


def _thinking_block(text: str) -> dict[str, Any]:
    # Pensieve does not sign reasoning: the signature is empty, and ignored when sent back.
    return {"type": "thinking", "thinking": text, "signature": ""}


def _tool_use_block(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": anthropic_id(call_id), "name": name, "input": arguments}


def _usage(usage: Usage) -> dict[str, int]:
    """Anthropic counts cache reads apart from `input_tokens`; Pensieve writes every prompt to
    its memory as a matter of course, so no tokens are billed as a separate cache write."""
    return {"input_tokens": usage.num_uncached_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": usage.num_cached_tokens,
            "output_tokens": usage.num_output_tokens}


async def _stream(gen: Generation) -> AsyncIterator[bytes]:
    blocks = _Blocks()
    started = False
    try:
        async for event in gen.events():
            if not started:
                started = True
                yield _opening(gen)
            if isinstance(event, Finished):
                for chunk in [*blocks.finish(), *_closing(gen, event)]:
                    yield chunk
            else:
                for chunk in blocks.feed(event):
                    yield chunk
    except PensieveError as exc:
        yield sse_event("error", error_payload(ApiFamily.ANTHROPIC, exc.status_code,
                                               exc.message))


class _Blocks:
    """A reply's content blocks as stream events: one block open at a time, each closed
    before the next starts (thinking, text, tool_use...), and a ping after the first start."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None  # the open block's type
        self.pinged = False

    def feed(self, event: Event) -> list[bytes]:
        if isinstance(event, TextDelta):
            return self._delta("text", {"type": "text_delta", "text": event.text}) \
                if event.text else []
        if isinstance(event, ReasoningDelta):
            return self._delta("thinking", {"type": "thinking_delta", "thinking": event.text})
        if isinstance(event, ToolCallStart):
            block = _tool_use_block(event.id, event.name, {})
            return [*self.close(), *self._start(block)]
        if isinstance(event, ToolArgsDelta) and self.open == "tool_use":
            return [self._event("content_block_delta",
                                {"type": "input_json_delta", "partial_json": event.text})]
        if isinstance(event, ToolCallEvent):
            return self.close()
        return []

    def close(self) -> list[bytes]:
        chunks = []
        if self.open == "thinking":
            chunks.append(self._event("content_block_delta",
                                      {"type": "signature_delta", "signature": ""}))
        if self.open is not None:
            chunks.append(sse_event("content_block_stop", {"index": self.index}))
        self.open = None
        return chunks

    def finish(self) -> list[bytes]:
        chunks = self.close()
        if not self.pinged:  # a reply without a block still pings once
            chunks.append(_PING)
            self.pinged = True
        return chunks

    def _delta(self, kind: str, delta: dict[str, Any]) -> list[bytes]:
        chunks = []
        if self.open != kind:
            block = _thinking_block("") if kind == "thinking" else {"type": "text", "text": ""}
            chunks = [*self.close(), *self._start(block)]
        return [*chunks, self._event("content_block_delta", delta)]

    def _start(self, block: dict[str, Any]) -> list[bytes]:
        self.index += 1
        self.open = block["type"]
        chunks = [sse_event("content_block_start", {"index": self.index,
                                                    "content_block": block})]
        if not self.pinged:
            chunks.append(_PING)
            self.pinged = True
        return chunks

    def _event(self, kind: str, delta: dict[str, Any]) -> bytes:
        return sse_event(kind, {"index": self.index, "delta": delta})


_PING = sse_event("ping", {})


def _opening(gen: Generation) -> bytes:
    message = {**_message(gen, []), "stop_reason": None, "stop_sequence": None,
               "usage": {**_usage(gen.usage), "output_tokens": 0}}
    return sse_event("message_start", {"message": message})


def _closing(gen: Generation, last: Finished) -> list[bytes]:
    return [sse_event("message_delta", {"delta": {"stop_reason": STOP_REASONS[last.reason],
                                                  "stop_sequence": last.stop_string},
                                        "usage": _usage(gen.usage)}),
            sse_event("message_stop", {})]
