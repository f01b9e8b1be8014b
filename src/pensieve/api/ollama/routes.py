"""Ollama-compatible routes: /api/chat, /api/generate, /api/version.

Streams NDJSON by default (one JSON object a line, the last with `done: true` and the timings);
`stream: false` answers one object. Durations are nanoseconds, measured on this request.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pensieve.api.base import parse_body
from pensieve.api.errors import ApiFamily, error_payload
from pensieve.api.generation import (
    Finish,
    Finished,
    Generation,
    Prompt,
    ReasoningDelta,
    TextDelta,
    ToolCallEvent,
    Turn,
    chat_template,
    open_model,
    render_prompt,
    start,
)
from pensieve.api.ollama.capabilities import fim_token_ids
from pensieve.api.ollama.go_template import render_go_template
from pensieve.api.ollama.protocol import ChatRequest, GenerateRequest, chat_turns
from pensieve.api.streaming import NDJSON, ReleasingStreamingResponse, ndjson, until_disconnect
from pensieve.api.tools import ToolCall, arguments_object
from pensieve.engine.types import ModelInfo
from pensieve.errors import InvalidRequest, PensieveError
from pensieve.runtime import ModelRuntime, ServedModel

router = APIRouter(tags=["ollama"])

# The Ollama release whose API these routes follow; clients gate features on it.
OLLAMA_API_VERSION = "0.12.0"
CACHED_TOKENS_HEADER = "X-Pensieve-Cached-Tokens"
# The one table from a finish to Ollama's done_reason.
DONE_REASONS = {Finish.END: "stop", Finish.STOP_STRING: "stop", Finish.LENGTH: "length",
                Finish.TOOL_CALLS: "stop", Finish.ABORT: "stop", Finish.ERROR: "stop"}


def _runtime(request: Request) -> ModelRuntime:
    runtime: ModelRuntime = request.app.state.runtime
    return runtime


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": OLLAMA_API_VERSION}


async def _open(request: Request, body: ChatRequest | GenerateRequest
                ) -> tuple[ServedModel, ModelInfo]:
    """Check a parsed chat or generate body, then load its model with its keep_alive."""
    body.warn_unknown_fields()
    body.check_supported()
    served, info = await open_model(_runtime(request), body.model, body.keep_alive)
    body.check_thinking(chat_template(info, served.defaults).source)
    return served, info


# --- chat ------------------------------------------------------------------------------------
@router.post("/api/chat", response_model=None)
async def chat(request: Request) -> JSONResponse | StreamingResponse:
    body = await parse_body(request, ChatRequest)
    served, info = await _open(request, body)
    if not body.messages:  # Ollama's way to load a model: answer at once, done_reason "load"
        return JSONResponse({**_head(served), "message": {"role": "assistant", "content": ""},
                             "done": True, "done_reason": "load"})
    prompt = Prompt(messages=chat_turns(body.messages))
    gen = await start(_runtime(request), body.to_generate(prompt, info.n_ctx_seq, "ollama-chat-"))
    pieces = _Pieces("chat", body.think is not False)
    if body.stream:
        return ReleasingStreamingResponse(_stream(gen, pieces), gen.aclose, media_type=NDJSON)
    choice = (await until_disconnect(request, gen.collect()))[0]
    piece = pieces.message(choice.text, choice.reasoning)
    if choice.tool_calls:
        piece["message"]["tool_calls"] = [_tool_call(k, c) for k, c in enumerate(choice.tool_calls)]
    reply = {**_head(served), **piece, **_final_fields(gen, choice.finish)}
    return JSONResponse(reply, headers=_cache_header(gen))


# --- generate --------------------------------------------------------------------------------
@router.post("/api/generate", response_model=None)
async def generate(request: Request) -> JSONResponse | StreamingResponse:
    body = await parse_body(request, GenerateRequest)
    served, info = await _open(request, body)
    if not body.prompt and not body.context and not body.suffix:
        return JSONResponse({**_head(served), "response": "", "done": True,
                             "done_reason": "load"})
    tokens = await _generate_tokens(served, info, body)
    prompt = _generate_prompt(body, tokens)
    gen = await start(_runtime(request), body.to_generate(prompt, info.n_ctx_seq, "ollama-gen-"))
    pieces = _Pieces("generate", body.think is not False)
    if body.stream:
        return ReleasingStreamingResponse(_stream(gen, pieces, tokens), gen.aclose,
                                          media_type=NDJSON)
    choice = (await until_disconnect(request, gen.collect()))[0]
    reply = {**_head(served), **pieces.message(choice.text, choice.reasoning),
             **_final_fields(gen, choice.finish), "context": tokens + choice.token_ids}
    return JSONResponse(reply, headers=_cache_header(gen))


async def _generate_tokens(served: ServedModel, info: ModelInfo,
                           body: GenerateRequest) -> list[int]:
    """The prompt's token ids: earlier `context` first, then this turn's prompt."""
    client = served.client
    if body.suffix:
        return await _fill_in_the_middle(served, info, body)
    if body.raw:
        prompt = body.prompt
    elif body.template is not None:
        prompt = render_go_template(body.template, body.system or "", body.prompt)
    else:
        prompt = render_prompt(info, _generate_chat(body), defaults=served.defaults,
                               template_kwargs=body.template_kwargs())
    if body.context:
        return list(body.context) + await client.tokenize(prompt, add_special=False)
    return await client.tokenize(prompt, add_special=True)


def _generate_chat(body: GenerateRequest) -> Prompt:
    system = (Turn("system", body.system),) if body.system else ()
    return Prompt(messages=(*system, Turn("user", body.prompt)))


def _generate_prompt(body: GenerateRequest, tokens: list[int]) -> Prompt:
    """The prompt's tokens; with `think`, a templated prompt goes as chat messages instead
    (the same tokens), so that the reply's reasoning is read apart from the response."""
    if body.think and not (body.raw or body.template is not None or body.context
                           or body.suffix):
        return _generate_chat(body)
    return Prompt(tokens=tuple(tokens))


async def _fill_in_the_middle(served: ServedModel, info: ModelInfo,
                              body: GenerateRequest) -> list[int]:
    """Prefix-suffix-middle order, with the model's own FIM tokens (llama.cpp's convention)."""
    ids = fim_token_ids(info.metadata)
    if ids is None:
        raise InvalidRequest(f"The model {served.name!r} does not support insert (suffix): it "
                             "has no fill-in-the-middle tokens.", param="suffix",
                             code="unsupported_feature")
    pre, suf, mid = ids
    prefix = await served.client.tokenize(body.prompt, add_special=False)
    suffix = await served.client.tokenize(body.suffix or "", add_special=False)
    return [pre, *prefix, suf, *suffix, mid]


# --- shared ----------------------------------------------------------------------------------
def _head(served: ServedModel) -> dict[str, Any]:
    return {"model": served.name, "created_at": _now()}


def _final_fields(gen: Generation, finish: Finish | None) -> dict[str, Any]:
    t, u = gen.timings, gen.usage
    return {"done": True, "done_reason": DONE_REASONS[finish or Finish.END],
            "total_duration": t.total_ns, "load_duration": t.load_ns,
            "prompt_eval_count": u.num_prompt_tokens, "prompt_eval_duration": t.prompt_eval_ns,
            "eval_count": u.num_output_tokens, "eval_duration": t.eval_ns,
            # Not an Ollama field: prompt tokens whose KV came from Pensieve's memory.
            "prompt_eval_cached_count": u.num_cached_tokens}


def _cache_header(gen: Generation) -> dict[str, str]:
    return {CACHED_TOKENS_HEADER: str(gen.usage.num_cached_tokens)}


async def _stream(gen: Generation, pieces: _Pieces,
                  prompt_tokens: list[int] | None = None) -> AsyncIterator[bytes]:
    head = {"model": gen.model}
    tokens = list(prompt_tokens or ())
    try:
        async for event in gen.events():
            piece: dict[str, Any] | None = None
            if isinstance(event, TextDelta):
                tokens.extend(event.token_ids)
                piece = pieces.message(event.text) if event.text else None
            elif isinstance(event, ReasoningDelta) and pieces.with_thinking:
                piece = pieces.message("", event.text)
            elif isinstance(event, ToolCallEvent):  # Ollama sends each call whole
                piece = pieces.message("")
                piece["message"]["tool_calls"] = [_tool_call(event.position, event.call)]
            elif isinstance(event, Finished):
                final = {**head, "created_at": _now(), **pieces.message(""),
                         **_final_fields(gen, event.reason)}
                if pieces.kind == "generate":
                    final["context"] = tokens
                yield ndjson(final)
            if piece is not None:
                yield ndjson({**head, "created_at": _now(), **piece, "done": False})
    except PensieveError as exc:
        yield ndjson(error_payload(ApiFamily.OLLAMA, exc.status_code, exc.message))


@dataclass(frozen=True, slots=True)
class _Pieces:
    """How a reply's text goes out: chat's `message` or generate's `response`, with its
    reasoning as `thinking` unless the request turned thinking off."""

    kind: str  # "chat" or "generate"
    with_thinking: bool

    def message(self, text: str, thinking: str = "") -> dict[str, Any]:
        extra = {"thinking": thinking} if thinking and self.with_thinking else {}
        if self.kind == "chat":
            return {"message": {"role": "assistant", "content": text, **extra}}
        return {"response": text, **extra}


def _tool_call(position: int, call: ToolCall) -> dict[str, Any]:
    """A call as Ollama writes it: the arguments as an object."""
    return {"id": call.id, "function": {"index": position, "name": call.name,
                                        "arguments": arguments_object(call.arguments)}}
