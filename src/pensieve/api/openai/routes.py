"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from pensieve.api.chat import render_prompt
from pensieve.api.errors import error_body
from pensieve.api.generation import (
    SSE_DONE,
    Collected,
    Generation,
    ReleasingStreamingResponse,
    TokenCounts,
    close_all,
    collect,
    merged,
    sse,
    start_all,
    until_disconnect,
)
from pensieve.api.model_defaults import with_model_defaults
from pensieve.api.openai.protocol import ChatCompletionRequest, CompletionRequest
from pensieve.api.openai.tools import parse_reply, render_messages, tool_grammar
from pensieve.engine.types import EngineRequest, SeqOutput, TokenLogprob
from pensieve.errors import InvalidRequest, PensieveError
from pensieve.runtime import ModelRuntime, ServedModel

router = APIRouter()

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _runtime(request: Request) -> ModelRuntime:
    runtime: ModelRuntime = request.app.state.runtime
    return runtime


def _served(request: Request, model: str, keep_alive: object) -> ServedModel:
    """The requested model; a `keep_alive` extension sets how long it stays loaded."""
    runtime = _runtime(request)
    served = runtime.get(model)
    runtime.apply_keep_alive(served, keep_alive)
    return served


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


# --- chat ------------------------------------------------------------------------------------
@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest,
                           request: Request) -> JSONResponse | StreamingResponse:
    body.warn_unknown_fields()
    served = _served(request, body.model, body.keep_alive)
    body = with_model_defaults(body, served.defaults)
    info = await served.client.ensure_started()
    prompt = render_prompt(info, render_messages(body), served.defaults)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    engine_req = EngineRequest(rid, body.to_sampling_params(_chat_grammar(body)), prompt=prompt,
                               use_cache=body.cache_prompt)
    gens = await start_all(served.client, [engine_req], body.n)
    meta = {"id": rid, "created": int(time.time()), "model": served.name,
            "system_fingerprint": _fingerprint(served)}
    if body.stream:
        render = _tool_choices(body.n) if body.uses_tools() else _text_choices
        stream = _chat_stream(gens, meta, body.n, body.include_usage(), render)
        return ReleasingStreamingResponse(stream, lambda: close_all(gens),
                                          media_type="text/event-stream", headers=_SSE_HEADERS)
    result = await until_disconnect(request, collect(merged(gens), body.n))
    return JSONResponse(_chat_response(meta, result, gens, body.uses_tools()))


def _chat_grammar(body: ChatCompletionRequest) -> str | None:
    if not body.uses_tools():
        return body.output_grammar()
    has_format = body.response_format is not None and body.response_format.type != "text"
    if body.grammar is not None or has_format:
        raise InvalidRequest("grammar and JSON response_format cannot be combined with tools; "
                             "send tool_choice 'none' or drop them.", param="tools")
    return tool_grammar(body)


def _chat_response(meta: dict[str, Any], result: Collected, gens: list[Generation],
                   uses_tools: bool = False) -> dict[str, Any]:
    choices = []
    for i, text in enumerate(result.texts):
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = result.finish_reasons[i]
        if uses_tools:
            reply = parse_reply(text)
            message["content"] = reply.content
            if reply.tool_calls:
                message["tool_calls"] = reply.tool_calls
                finish = "tool_calls"
        choices.append({
            "index": i,
            "message": message,
            "logprobs": _chat_logprobs(result.logprobs[i]) if result.logprobs[i] else None,
            "finish_reason": finish,
        })
    return {**meta, "object": "chat.completion", "choices": choices,
            "usage": _usage(gens, result.counts)}


ChoiceRenderer = Callable[[SeqOutput], list[dict[str, Any]]]


def _text_choices(out: SeqOutput) -> list[dict[str, Any]]:
    """A plain answer streams as it comes: one chunk per output that says something."""
    lp = _chat_logprobs(out.logprobs) if out.logprobs else None
    if not (out.text or out.finish_reason is not None or lp):
        return []
    return [_chunk_choice(out.index, {"content": out.text} if out.text else {}, out, lp)]


def _tool_choices(n: int) -> ChoiceRenderer:
    """Tool replies are JSON that only means something whole: each choice is collected, then
    sent as OpenAI's deltas (content, or per call: id and name, then the arguments)."""
    texts: list[str] = [""] * n
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]

    def render(out: SeqOutput) -> list[dict[str, Any]]:
        texts[out.index] += out.text
        logprobs[out.index].extend(out.logprobs or [])
        if out.finish_reason is None:
            return []
        return _tool_chunks(out, texts[out.index], logprobs[out.index])
    return render


def _tool_chunks(out: SeqOutput, text: str,
                 logprobs: list[TokenLogprob]) -> list[dict[str, Any]]:
    reply = parse_reply(text)
    lp = _chat_logprobs(logprobs) if logprobs else None
    chunks = []
    if reply.content:
        chunks.append(_chunk_choice(out.index, {"content": reply.content}, None, lp))
    for k, call in enumerate(reply.tool_calls):
        head = {"index": k, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""}}
        args = {"index": k, "function": {"arguments": call["function"]["arguments"]}}
        first_lp = None if chunks else lp  # logprobs ride on the choice's first chunk
        chunks.append(_chunk_choice(out.index, {"tool_calls": [head]}, None, first_lp))
        chunks.append(_chunk_choice(out.index, {"tool_calls": [args]}))
    last = _chunk_choice(out.index, {}, out)
    if reply.tool_calls:
        last["finish_reason"] = "tool_calls"
    chunks.append(last)
    return chunks


async def _chat_stream(gens: list[Generation], meta: dict[str, Any], n: int,
                       include_usage: bool, render: ChoiceRenderer) -> AsyncIterator[bytes]:
    base = {**meta, "object": "chat.completion.chunk"}
    counts = TokenCounts()
    outputs = merged(gens)
    try:
        for i in range(n):
            yield sse({**base, "choices": [_chunk_choice(i, {"role": "assistant", "content": ""})]})
        async for out in outputs:
            counts.observe(out)
            for choice in render(out):
                yield sse({**base, "choices": [choice]})
        if include_usage:
            yield sse({**base, "choices": [], "usage": _usage(gens, counts)})
        yield SSE_DONE
    except PensieveError as exc:
        yield sse(error_body(exc))
    finally:
        await outputs.aclose()  # type: ignore[attr-defined]


def _chunk_choice(index: int, delta: dict[str, Any], out: SeqOutput | None = None,
                  logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    finish = str(out.finish_reason) if out is not None and out.finish_reason else None
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


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
    served = _served(request, body.model, body.keep_alive)
    body = with_model_defaults(body, served.defaults)
    await served.client.ensure_started()
    rid = f"cmpl-{uuid.uuid4().hex}"
    params = body.to_sampling_params()
    prompts = body.prompts()
    engine_reqs = [
        EngineRequest(f"{rid}-{i}", params, prompt=p, use_cache=body.cache_prompt)
        if isinstance(p, str)
        else EngineRequest(f"{rid}-{i}", params, prompt_tokens=tuple(p),
                           use_cache=body.cache_prompt)
        for i, p in enumerate(prompts)
    ]
    gens = await start_all(served.client, engine_reqs, body.n)
    meta = {"id": rid, "created": int(time.time()), "model": served.name,
            "system_fingerprint": _fingerprint(served)}
    echoes = [p if body.echo and isinstance(p, str) else "" for p in prompts]
    num_choices = len(prompts) * body.n
    if body.stream:
        stream = _completion_stream(gens, meta, num_choices, body, echoes)
        return ReleasingStreamingResponse(stream, lambda: close_all(gens),
                                          media_type="text/event-stream", headers=_SSE_HEADERS)
    result = await until_disconnect(request, collect(merged(gens), num_choices))
    choices = []
    for i, text in enumerate(result.texts):
        lp = result.logprobs[i]
        choices.append({"index": i, "text": echoes[i // body.n] + text,
                        "logprobs": _completion_logprobs(lp) if body.logprobs is not None else None,
                        "finish_reason": result.finish_reasons[i]})
    return JSONResponse({**meta, "object": "text_completion", "choices": choices,
                         "usage": _usage(gens, result.counts)})


async def _completion_stream(gens: list[Generation], meta: dict[str, Any], num_choices: int,
                             body: CompletionRequest, echoes: list[str]) -> AsyncIterator[bytes]:
    base = {**meta, "object": "text_completion"}
    counts = TokenCounts()
    echoed = [False] * num_choices
    outputs = merged(gens)
    try:
        async for out in outputs:
            i = out.index
            counts.observe(out)
            text = out.text
            if not echoed[i]:
                text, echoed[i] = echoes[i // body.n] + text, True
            lp = _completion_logprobs(out.logprobs) if out.logprobs else None
            if text or out.finish_reason is not None or lp:
                finish = str(out.finish_reason) if out.finish_reason else None
                choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
                yield sse({**base, "choices": [choice]})
        if body.include_usage():
            yield sse({**base, "choices": [], "usage": _usage(gens, counts)})
        yield SSE_DONE
    except PensieveError as exc:
        yield sse(error_body(exc))
    finally:
        await outputs.aclose()  # type: ignore[attr-defined]


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


# --- shared ----------------------------------------------------------------------------------
def _usage(gens: list[Generation], counts: TokenCounts) -> dict[str, Any]:
    prompt = sum(g.num_prompt_tokens for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": counts.num_output,
            "total_tokens": prompt + counts.num_output,
            "prompt_tokens_details": {"cached_tokens": counts.num_cached}}


def _fingerprint(served: ServedModel) -> str:
    return f"pensieve-{served.name}"


# --- llama-server style tokenizer endpoint ---------------------------------------------------
class TokenizeBody(BaseModel):
    model_config = ConfigDict(strict=True)
    content: str = Field(max_length=1 << 22)
    model: str | None = None
    add_special: bool = False


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(strict=True)
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
