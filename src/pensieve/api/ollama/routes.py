"""Ollama-compatible routes: /api/chat, /api/generate, /api/version.

Streams NDJSON by default (one JSON object a line, the last with `done: true` and the timings);
`stream: false` answers one object. Durations are nanoseconds, measured on this request.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pensieve.api.base import parse_body
from pensieve.api.chat import ChatMessage, TextGeneration, TextRequest, render_messages, start_text
from pensieve.api.errors import ApiFamily, error_payload
from pensieve.api.generation import ReleasingStreamingResponse, until_disconnect
from pensieve.api.ollama.go_template import render_go_template
from pensieve.api.ollama.protocol import ChatRequest, GenerateRequest
from pensieve.engine.types import FinishReason, ModelInfo
from pensieve.errors import InvalidRequest, PensieveError
from pensieve.runtime import ModelRuntime, ServedModel

router = APIRouter(tags=["ollama"])

# The Ollama release whose API these routes follow; clients gate features on it.
OLLAMA_API_VERSION = "0.12.0"
CACHED_TOKENS_HEADER = "X-Pensieve-Cached-Tokens"
_NDJSON = "application/x-ndjson"
_FIM_KEYS = (("fim_pre", "prefix"), ("fim_suf", "suffix"), ("fim_mid", "middle"))


def _runtime(request: Request) -> ModelRuntime:
    return request.app.state.runtime


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": OLLAMA_API_VERSION}


def _serve(request: Request, body: ChatRequest | GenerateRequest) -> ServedModel:
    """Check a parsed chat or generate body, then find its model and apply its keep_alive."""
    body.warn_unknown_fields()
    body.check_supported()
    runtime = _runtime(request)
    served = runtime.get(body.model)
    runtime.apply_keep_alive(served, body.keep_alive)
    return served


# --- chat ------------------------------------------------------------------------------------
@router.post("/api/chat", response_model=None)
async def chat(request: Request) -> JSONResponse | StreamingResponse:
    body = await parse_body(request, ChatRequest)
    served = _serve(request, body)
    messages = tuple(m.to_message() for m in body.messages)
    info = await served.client.ensure_started()
    if not messages:  # Ollama's way to load a model: answer at once, done_reason "load"
        return JSONResponse({**_head(served), "message": {"role": "assistant", "content": ""},
                             "done": True, "done_reason": "load"})
    text_req = TextRequest(body.sampling_params(info.n_ctx_seq, served.defaults),
                           messages=messages, response_format=body.response_format)
    gen = await start_text(served, text_req, id_prefix="ollama-chat-")
    if body.stream:
        return ReleasingStreamingResponse(_stream(gen, "chat"), gen.aclose, media_type=_NDJSON)
    completion = await until_disconnect(request, gen.collect())
    reply = {**_head(served), "message": {"role": "assistant", "content": completion.text},
             **_final_fields(gen, completion.finish_reason)}
    return JSONResponse(reply, headers=_cache_header(gen))


# --- generate --------------------------------------------------------------------------------
@router.post("/api/generate", response_model=None)
async def generate(request: Request) -> JSONResponse | StreamingResponse:
    body = await parse_body(request, GenerateRequest)
    served = _serve(request, body)
    info = await served.client.ensure_started()
    if not body.prompt and not body.context and not body.suffix:
        return JSONResponse({**_head(served), "response": "", "done": True,
                             "done_reason": "load"})
    tokens = await _generate_tokens(served, info, body)
    text_req = TextRequest(body.sampling_params(info.n_ctx_seq, served.defaults),
                           prompt_tokens=tuple(tokens), response_format=body.response_format)
    gen = await start_text(served, text_req, id_prefix="ollama-gen-")
    if body.stream:
        return ReleasingStreamingResponse(_stream(gen, "generate"), gen.aclose, media_type=_NDJSON)
    completion = await until_disconnect(request, gen.collect())
    reply = {**_head(served), "response": completion.text,
             **_final_fields(gen, completion.finish_reason),
             "context": tokens + completion.token_ids}
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
        system = (ChatMessage("system", body.system),) if body.system else ()
        prompt = render_messages(info, (*system, ChatMessage("user", body.prompt)),
                                 defaults=served.defaults)
    if body.context:
        return list(body.context) + await client.tokenize(prompt, add_special=False)
    return await client.tokenize(prompt, add_special=True)


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


def fim_token_ids(metadata: dict[str, str]) -> tuple[int, int, int] | None:
    """The model's fill-in-the-middle tokens (prefix, suffix, middle), if its GGUF names them."""
    ids: list[int] = []
    for new, old in _FIM_KEYS:
        value = metadata.get(f"tokenizer.ggml.{new}_token_id",
                             metadata.get(f"tokenizer.ggml.{old}_token_id"))
        if value is None or not value.lstrip("-").isdigit() or int(value) < 0:
            return None
        ids.append(int(value))
    return ids[0], ids[1], ids[2]


# --- shared ----------------------------------------------------------------------------------
def _head(served: ServedModel) -> dict[str, Any]:
    return {"model": served.name, "created_at": _now()}


def _done_reason(reason: FinishReason | None) -> str:
    return "length" if reason is FinishReason.LENGTH else "stop"


def _final_fields(gen: TextGeneration, reason: FinishReason | None) -> dict[str, Any]:
    t, u = gen.timings, gen.usage
    return {"done": True, "done_reason": _done_reason(reason),
            "total_duration": t.total_ns, "load_duration": t.load_ns,
            "prompt_eval_count": u.num_prompt_tokens, "prompt_eval_duration": t.prompt_eval_ns,
            "eval_count": u.num_output_tokens, "eval_duration": t.eval_ns,
            # Not an Ollama field: prompt tokens whose KV came from Pensieve's memory.
            "prompt_eval_cached_count": u.num_cached_tokens}


def _cache_header(gen: TextGeneration) -> dict[str, str]:
    return {CACHED_TOKENS_HEADER: str(gen.usage.num_cached_tokens)}


async def _stream(gen: TextGeneration, kind: str) -> AsyncIterator[bytes]:
    head = {"model": gen.model}
    tokens = list(gen.prompt_tokens or ())
    try:
        async for delta in gen.deltas():
            tokens.extend(delta.token_ids)
            if delta.text:
                yield _line({**head, "created_at": _now(), **_piece(kind, delta.text),
                             "done": False})
            if delta.finish_reason is not None:
                final = {**head, "created_at": _now(), **_piece(kind, ""),
                         **_final_fields(gen, delta.finish_reason)}
                if kind == "generate":
                    final["context"] = tokens
                yield _line(final)
    except PensieveError as exc:
        yield _line(error_payload(ApiFamily.OLLAMA, exc.status_code, exc.message))


def _piece(kind: str, text: str) -> dict[str, Any]:
    if kind == "chat":
        return {"message": {"role": "assistant", "content": text}}
    return {"response": text}


def _line(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode() + b"\n"
