"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models, and
llama-server's /tokenize and /detokenize.

A streamed token costs one small JSON object: each stream renders its constant fields (id,
model, ...) once, and every chunk is those bytes around the choice that changed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from json.encoder import encode_basestring  # the string encoder of json.dumps(ensure_ascii=False)
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field

from pensieve.api.base import StrictBody
from pensieve.api.errors import error_body
from pensieve.api.generation import (
    Choice,
    Finish,
    Finished,
    Generation,
    ReasoningDelta,
    TextDelta,
    ToolArgsDelta,
    ToolCallStart,
    Usage,
    start,
)
from pensieve.api.openai.protocol import ChatCompletionRequest, CompletionRequest
from pensieve.api.streaming import SSE_DONE, dumps, event_stream, sse, until_disconnect
from pensieve.api.tools import ToolCall
from pensieve.engine.types import TokenLogprob
from pensieve.errors import PensieveError
from pensieve.runtime import ModelRuntime, ServedModel

router = APIRouter()

# The one table from a finish to OpenAI's finish_reason.
FINISH_REASONS = {Finish.END: "stop", Finish.STOP_STRING: "stop", Finish.LENGTH: "length",
                  Finish.TOOL_CALLS: "tool_calls", Finish.ABORT: "abort",
                  Finish.ERROR: "error"}


def _runtime(request: Request) -> ModelRuntime:
    runtime: ModelRuntime = request.app.state.runtime
    return runtime


def _model_card(served: ServedModel) -> dict[str, Any]:
    card: dict[str, Any] = {"id": served.name, "object": "model", "created": served.created,
                            "owned_by": "pensieve"}
    info = served.client.info
    if info is not None:
        card["meta"] = {"n_ctx": info.n_ctx_seq, "n_ctx_train": info.n_ctx_train,
                        "n_params": info.num_params, "size": info.size_bytes,
                        "n_vocab": info.n_vocab, "description": info.description}
    return card


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    rows = _runtime(request).listing()  # served models, then the store's
    data = [_model_card(served) if served is not None else
            {"id": name, "object": "model", "created": int(manifest.created) if manifest else 0,
             "owned_by": "pensieve"} for name, served, manifest in rows]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    return _model_card(_runtime(request).get(model_id))


def _meta(gen: Generation) -> dict[str, Any]:
    return {"id": gen.request_id, "created": int(time.time()), "model": gen.model,
            "system_fingerprint": f"pensieve-{gen.model}"}


def _usage(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.num_prompt_tokens,
            "completion_tokens": usage.num_output_tokens,
            "total_tokens": usage.num_total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.num_cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": usage.num_reasoning_tokens}}


def _finish_reason(choice: Choice) -> str | None:
    return FINISH_REASONS[choice.finish] if choice.finish is not None else None


class _Chunks:
    """Renders a stream's chunks: the constant head once, then one choice per chunk."""

    def __init__(self, meta: dict[str, Any], kind: str) -> None:
        head = dumps({**meta, "object": kind})
        self._prefix = f"data: {head[:-1]},\"choices\":[".encode()

    def choice(self, choice: dict[str, Any]) -> bytes:
        return self._prefix + dumps(choice).encode() + b"]}\n\n"

    def text(self, index: int, text: str, around: tuple[bytes, bytes]) -> bytes:
        """The chunk of nearly every token, a plain text delta: the same bytes as `choice`
        renders, without the generic encoder. `around`: the JSON before and after the text."""
        return b"".join((self._prefix, b'{"index":', str(index).encode(), around[0],
                         encode_basestring(text).encode(), around[1]))

    def usage(self, usage: Usage) -> bytes:
        return self._prefix + b"]," + f"\"usage\":{dumps(_usage(usage))}}}\n\n".encode()


# What surrounds the text of a plain text chunk (`_Chunks.text`), chat's and completions'.
_CHAT_TEXT = (b',"delta":{"content":', b'},"logprobs":null,"finish_reason":null}]}\n\n')
_COMPLETION_TEXT = (b',"text":', b',"logprobs":null,"finish_reason":null}]}\n\n')


async def _sse_stream(gen: Generation, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks, then [DONE]; an engine error ends the stream with an error event."""
    try:
        async for chunk in chunks:
            yield chunk
        yield SSE_DONE
    except PensieveError as exc:
        yield sse(error_body(exc))
    finally:
        await gen.aclose()


# --- chat ------------------------------------------------------------------------------------
@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest,
                           request: Request) -> JSONResponse | StreamingResponse:
    body.warn_unknown_fields()
    gen = await start(_runtime(request), body.to_generate())
    if body.stream:
        chunks = _chat_chunks(gen, body.include_usage())
        return event_stream(_sse_stream(gen, chunks), gen.aclose)
    choices = await until_disconnect(request, gen.collect())
    return JSONResponse({**_meta(gen), "object": "chat.completion",
                         "choices": [_chat_choice(i, c) for i, c in enumerate(choices)],
                         "usage": _usage(gen.usage)})


def _chat_choice(index: int, choice: Choice) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": choice.text}
    if choice.reasoning:
        message["reasoning_content"] = choice.reasoning
    if choice.tool_calls:
        message["content"] = choice.text or None
        message["tool_calls"] = [_tool_call(c) for c in choice.tool_calls]
    logprobs = _chat_logprobs(choice.logprobs) if choice.logprobs else None
    return {"index": index, "message": message, "logprobs": logprobs,
            "finish_reason": _finish_reason(choice)}


def _tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


async def _chat_chunks(gen: Generation, include_usage: bool) -> AsyncIterator[bytes]:
    chunks = _Chunks(_meta(gen), "chat.completion.chunk")
    for i in range(gen.num_choices):
        yield chunks.choice(_delta(i, {"role": "assistant", "content": ""}))
    async for event in gen.events():
        if isinstance(event, TextDelta):
            if event.text and not event.logprobs:
                yield chunks.text(event.index, event.text, _CHAT_TEXT)
            elif event.text or event.logprobs:
                lp = _chat_logprobs(event.logprobs) if event.logprobs else None
                content = {"content": event.text} if event.text else {}
                yield chunks.choice(_delta(event.index, content, lp))
        elif isinstance(event, ReasoningDelta):
            yield chunks.choice(_delta(event.index, {"reasoning_content": event.text}))
        elif isinstance(event, ToolCallStart):  # id and name first, then the arguments
            head = {"index": event.position, "id": event.id, "type": "function",
                    "function": {"name": event.name, "arguments": ""}}
            yield chunks.choice(_delta(event.index, {"tool_calls": [head]}))
        elif isinstance(event, ToolArgsDelta):
            args = {"index": event.position, "function": {"arguments": event.text}}
            yield chunks.choice(_delta(event.index, {"tool_calls": [args]}))
        elif isinstance(event, Finished):
            yield chunks.choice(_delta(event.index, {}, finish=event))
    if include_usage:
        yield chunks.usage(gen.usage)


def _delta(index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None = None,
           finish: Finished | None = None) -> dict[str, Any]:
    reason = FINISH_REASONS[finish.reason] if finish is not None else None
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}


def _chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": [_logprob_entry(e) for e in entries], "refusal": None}


def _logprob_entry(e: TokenLogprob) -> dict[str, Any]:
    return {
        **_token_fields(e.token, e.logprob),
        "top_logprobs": [_token_fields(tok, lp) for _, tok, lp in e.top],
    }


def _token_fields(token: bytes, logprob: float) -> dict[str, Any]:
    return {"token": token.decode("utf-8", errors="replace"), "logprob": logprob,
            "bytes": list(token)}


# --- legacy completions ----------------------------------------------------------------------
@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest,
                      request: Request) -> JSONResponse | StreamingResponse:
    body.warn_unknown_fields()
    gen = await start(_runtime(request), body.to_generate())
    echoes = [p if body.echo and isinstance(p, str) else "" for p in body.prompts()
              for _ in range(body.n)]
    if body.stream:
        chunks = _completion_chunks(gen, echoes, body.include_usage())
        return event_stream(_sse_stream(gen, chunks), gen.aclose)
    choices = await until_disconnect(request, gen.collect())
    with_logprobs = body.logprobs is not None
    return JSONResponse({**_meta(gen), "object": "text_completion", "usage": _usage(gen.usage),
                         "choices": [{"index": i, "text": echoes[i] + c.text,
                                      "logprobs": _completion_logprobs(c.logprobs)
                                      if with_logprobs else None,
                                      "finish_reason": _finish_reason(c)}
                                     for i, c in enumerate(choices)]})


async def _completion_chunks(gen: Generation, echoes: list[str],
                             include_usage: bool) -> AsyncIterator[bytes]:
    chunks = _Chunks(_meta(gen), "text_completion")
    pending = list(echoes)  # each choice's echo goes out with its first chunk
    async for event in gen.events():
        i = event.index
        text, lp, reason = "", None, None
        if isinstance(event, TextDelta):
            text = event.text
            lp = _completion_logprobs(event.logprobs) if event.logprobs else None
        elif isinstance(event, Finished):
            reason = FINISH_REASONS[event.reason]
        text, pending[i] = pending[i] + text, ""
        if text and lp is None and reason is None:
            yield chunks.text(i, text, _COMPLETION_TEXT)
        elif text or lp or reason:
            yield chunks.choice({"index": i, "text": text, "logprobs": lp,
                                 "finish_reason": reason})
    if include_usage:
        yield chunks.usage(gen.usage)


def _completion_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    tokens = [e.token.decode("utf-8", errors="replace") for e in entries]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{tok.decode("utf-8", errors="replace"): lp for _, tok, lp in e.top}
                         for e in entries],
        "text_offset": offsets,
    }


# --- llama-server style tokenizer endpoints ---------------------------------------------------
class TokenizeBody(StrictBody):
    content: str = Field(max_length=1 << 22)
    model: str | None = None
    add_special: bool = False


class DetokenizeBody(StrictBody):
    tokens: list[int] = Field(max_length=1 << 20)
    model: str | None = None


@router.post("/tokenize")
async def tokenize(body: TokenizeBody, request: Request) -> dict[str, Any]:
    served = _runtime(request).get_or_first(body.model)
    return {"tokens": await served.client.tokenize(body.content, body.add_special)}


@router.post("/detokenize")
async def detokenize(body: DetokenizeBody, request: Request) -> dict[str, Any]:
    served = _runtime(request).get_or_first(body.model)
    return {"content": await served.client.detokenize(body.tokens)}
