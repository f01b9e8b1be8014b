"""A Responses conversation as items, and the chat turns the model's template renders from it.

Items are plain dicts in OpenAI's shape, as they are stored and listed (each with an `id`):

    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": ...}]}
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", ...}]}
    {"type": "function_call", "call_id": ..., "name": ..., "arguments": "<JSON text>"}
    {"type": "function_call_output", "call_id": ..., "output": "<text>"}
    {"type": "reasoning", "summary": [...], "content": [{"type": "reasoning_text", ...}]}

A follow-up (`previous_response_id`) renders the previous response's input items, its output
items and the new input through the same template, so the earlier turns come out as the same
text, and the engine's memory finds their KV: an assistant message and the function calls after
it are one assistant turn (the model wrote them as one reply), calls keep their ids, and
reasoning is left out as chat templates leave out past reasoning.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from pensieve.api.generation import Turn
from pensieve.api.tools import ToolCall
from pensieve.errors import InvalidRequest

Item = dict[str, Any]

# Item id prefixes, as OpenAI's.
PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco",
            "reasoning": "rs"}


def new_id(kind: str) -> str:
    return f"{PREFIXES[kind]}_{uuid.uuid4().hex}"


def message_item(role: str, text: str, item_id: str | None = None,
                 status: str = "completed") -> Item:
    """A message item; assistant text is `output_text`, everyone else's `input_text`."""
    if role == "assistant":
        part: Item = {"type": "output_text", "text": text, "annotations": []}
    else:
        part = {"type": "input_text", "text": text}
    return {"id": item_id or new_id("message"), "type": "message", "role": role,
            "status": status, "content": [part]}


def text_of(content: Sequence[Item]) -> str:
    """The text of a message's (or a function output's) parts."""
    return "".join(str(p.get("text", p.get("refusal", ""))) for p in content)


def to_turns(items: Sequence[Item], instructions: str | None = None) -> tuple[Turn, ...]:
    """The chat turns of a conversation, `instructions` first as a system turn. Raises 400
    for a function_call_output whose call_id no earlier function_call has."""
    turns: list[Turn] = [Turn("system", instructions)] if instructions else []
    call_ids: set[str] = set()
    open_reply = False  # the last turn is an assistant reply that calls may still join
    for i, item in enumerate(items):
        kind = item["type"]
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            turns.append(Turn(role, text_of(item["content"])))
            open_reply = role == "assistant"
        elif kind == "function_call":
            call = ToolCall(item["call_id"], item["name"], item["arguments"])
            call_ids.add(call.id)
            if open_reply:
                last = turns[-1]
                turns[-1] = Turn(last.role, last.content, (*last.tool_calls, call))
            else:
                turns.append(Turn("assistant", "", (call,)))
            open_reply = True
        elif kind == "function_call_output":
            if item["call_id"] not in call_ids:
                raise InvalidRequest(
                    f"No function_call with call_id {item['call_id']!r} comes before this "
                    "function_call_output: send the call too, or the previous_response_id "
                    "of the response that made it.", param=f"input[{i}]",
                    code="unknown_call_id")
            turns.append(Turn("tool", _output_text(item["output"]),
                              tool_call_id=item["call_id"]))
            open_reply = False
        # reasoning items are not rendered; an assistant reply may go on after one
    return tuple(turns)


def _output_text(output: str | Sequence[Item]) -> str:
    return output if isinstance(output, str) else text_of(output)


def page(items: Sequence[Item], *, order: str, limit: int, after: str | None) -> Item:
    """One page of items as OpenAI's list object (`after`: the id the page starts after)."""
    ordered = list(items) if order == "asc" else list(reversed(items))
    start = 0
    if after is not None:
        ids = [it["id"] for it in ordered]
        if after not in ids:
            raise InvalidRequest(f"No input item has the id {after!r}.", param="after")
        start = ids.index(after) + 1
    data = ordered[start:start + limit]
    return {"object": "list", "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": start + limit < len(ordered)}
