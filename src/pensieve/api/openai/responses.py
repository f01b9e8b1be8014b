"""OpenAI's Responses API: POST /v1/responses (streamed or not), GET and DELETE
/v1/responses/{id}, GET /v1/responses/{id}/input_items.

A response runs on the one generation path. Its conversation is the previous response's input
items and output items (`previous_response_id`, read from the response store) followed by the
new input, rendered through the model's template as chat turns (`responses_items.to_turns`);
the earlier turns render as the same tokens as before, so Pensieve's memory serves their KV and
`usage.input_tokens_details.cached_tokens` counts them. A stored response is saved before its
last event goes out, so a follow-up sent at once finds it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pensieve.api.generation import Finish, Generation, Usage, start
from pensieve.api.openai.responses_items import Item, page, to_turns
from pensieve.api.openai.responses_output import ResponseOutput, WireEvent
from pensieve.api.openai.responses_protocol import ResponsesRequest
from pensieve.api.openai.responses_store import ResponseStore, StoredResponse, is_response_id
from pensieve.api.streaming import event_stream, sse_event, until_disconnect
from pensieve.errors import NotFound, PensieveError
from pensieve.runtime import ModelRuntime

log = logging.getLogger("pensieve.api.responses")
router = APIRouter()

# A finish -> the response's status.
STATUSES = {Finish.END: "completed", Finish.STOP_STRING: "completed",
            Finish.TOOL_CALLS: "completed", Finish.LENGTH: "incomplete",
            Finish.ABORT: "cancelled", Finish.ERROR: "failed"}
# The event that ends a stream, by the response's status.
FINAL_EVENTS = {"completed": "response.completed", "incomplete": "response.incomplete",
                "cancelled": "response.failed", "failed": "response.failed"}


def _store(request: Request) -> ResponseStore:
    store: ResponseStore = request.app.state.responses
    return store


async def _stored(request: Request, rid: str, param: str | None = None) -> StoredResponse:
    """The stored response, or a 404 in OpenAI's shape."""
    found = await asyncio.to_thread(_store(request).get, rid) if is_response_id(rid) else None
    if found is None:
        what = "Previous response" if param else "Response"
        raise NotFound(f"{what} with id {rid!r} not found.", param=param,
                       code="previous_response_not_found" if param else "not_found")
    return found


# --- create ----------------------------------------------------------------------------------
@router.post("/v1/responses", response_model=None)
async def create_response(body: ResponsesRequest,
                          request: Request) -> JSONResponse | StreamingResponse:
    body.warn_unknown_fields()
    body.check_supported()
    new_items = body.input_items()
    carried: list[Item] = []
    session: str | None = None  # the chain's conversation, which a cluster routes by
    if body.previous_response_id is not None:
        previous = await _stored(request, body.previous_response_id, "previous_response_id")
        carried = [*previous.input, *previous.response["output"]]
        session = previous.session or previous.id
    conversation = [*carried, *new_items]
    generate = dataclasses.replace(
        body.to_generate(to_turns(conversation, body.instructions)),
        session_id=session or body.user, starts_session=session is None)
    runtime: ModelRuntime = request.app.state.runtime
    gen = await start(runtime, generate)
    run = _Run(gen, body, conversation, _store(request))
    if body.stream:
        return event_stream(run.stream(), gen.aclose)
    await until_disconnect(request, run.collect())
    response = run.response()
    await run.save(response)
    return JSONResponse(response)


class _Run:
    """One response being made: its output as it grows, the Response object, its storing."""

    def __init__(self, gen: Generation, body: ResponsesRequest, conversation: list[Item],
                 store: ResponseStore) -> None:
        self.gen = gen
        self.body = body
        self.conversation = conversation
        self.store = store
        self.output = ResponseOutput()
        self.created_at = int(time.time())
        self.error: dict[str, Any] | None = None
        self._sequence = itertools.count()

    async def collect(self) -> None:
        async for event in self.gen.events():
            self.output.feed(event)

    async def stream(self) -> AsyncIterator[bytes]:
        yield self._event({"type": "response.created", "response": self.response()})
        yield self._event({"type": "response.in_progress", "response": self.response()})
        try:
            async for event in self.gen.events():
                for wire in self.output.feed(event):
                    yield self._event(wire)
        except PensieveError as exc:  # the engine failed it: the stream ends with the error
            self.error = {"code": "server_error", "message": exc.message}
            yield self._event({"type": "error", "code": exc.code or "server_error",
                               "message": exc.message, "param": exc.param})
        response = self.response()
        await self.save(response)
        yield self._event({"type": FINAL_EVENTS.get(response["status"], "response.completed"),
                           "response": response})

    async def save(self, response: dict[str, Any]) -> None:
        if not self.body.store:
            return
        try:
            stored = StoredResponse(response, self.conversation, self.gen.session_id)
            await asyncio.to_thread(self.store.save, stored)
        except OSError as exc:  # the answer still goes out; only its follow-ups will miss it
            log.error("could not store response %s: %s", response["id"], exc)

    def response(self) -> dict[str, Any]:
        """The Response object as it stands."""
        status = self._status()
        out = self.output
        done = status != "in_progress"
        return {"id": self.gen.request_id, "object": "response",
                "created_at": self.created_at, "status": status,
                "completed_at": int(time.time()) if status == "completed" else None,
                "error": self.error,
                "incomplete_details": {"reason": "max_output_tokens"}
                if status == "incomplete" else None,
                "model": self.gen.model, "output": out.items if done else [],
                **self.body.echo(), "background": False,
                "usage": _usage(self.gen.usage) if done else None}

    def _status(self) -> str:
        if self.error is not None:
            return "failed"
        finish = self.output.finish
        return "in_progress" if finish is None else STATUSES[finish]

    def _event(self, event: WireEvent) -> bytes:
        kind = event.pop("type")
        return sse_event(kind, {**event, "sequence_number": next(self._sequence)})


def _usage(usage: Usage) -> dict[str, Any]:
    return {"input_tokens": usage.num_prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.num_cached_tokens,
                                     "cache_write_tokens": 0},
            "output_tokens": usage.num_output_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.num_reasoning_tokens},
            "total_tokens": usage.num_total_tokens}


# --- stored responses ------------------------------------------------------------------------
@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request) -> dict[str, Any]:
    return (await _stored(request, response_id)).response


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
    await _stored(request, response_id)
    await asyncio.to_thread(_store(request).delete, response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(response_id: str, request: Request,
                           order: Literal["asc", "desc"] = "desc",
                           limit: Annotated[int, Query(ge=1, le=100)] = 20,
                           after: str | None = None) -> dict[str, Any]:
    stored = await _stored(request, response_id)
    return page(stored.input, order=order, limit=limit, after=after)
