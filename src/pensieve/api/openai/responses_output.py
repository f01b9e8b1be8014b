"""A response's output items, built from the generation's events as they come, with the
streaming events that tell a client about each step (OpenAI's Responses event sequence):

    reasoning     output_item.added, content_part.added, reasoning_text.delta*,
                  reasoning_text.done, content_part.done, output_item.done
    message       output_item.added, content_part.added, output_text.delta*,
                  output_text.done, content_part.done, output_item.done
    function_call output_item.added, function_call_arguments.delta*,
                  function_call_arguments.done, output_item.done

One item is open at a time: a new kind of event closes it and opens the next, so the items come
in the order the model wrote them (reasoning, text, calls). Events are dicts with their `type`;
the route numbers and frames them.
"""

from __future__ import annotations

from typing import Any

from pensieve.api.generation import (
    Event,
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolArgsDelta,
    ToolCallEvent,
    ToolCallStart,
)
from pensieve.api.openai.responses_items import Item, new_id

WireEvent = dict[str, Any]


class ResponseOutput:
    """The output of one response. `feed` each event of the generation; `items` is the output
    so far, `finish` why it ended (None while running)."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.finish: Finish | None = None
        self._open: Item | None = None
        self._text = ""  # the open item's text (reasoning, message, or call arguments)

    def feed(self, event: Event) -> list[WireEvent]:
        if isinstance(event, TextDelta):
            return self._grow("message", event.text) if event.text else []
        if isinstance(event, ReasoningDelta):
            return self._grow("reasoning", event.text) if event.text else []
        if isinstance(event, ToolCallStart):
            return [*self._close("completed"), *self._open_call(event)]
        if isinstance(event, ToolArgsDelta):
            return self._grow("function_call", event.text)
        if isinstance(event, ToolCallEvent):
            return self._done_call(event)
        self.finish = event.reason  # Finished
        return self._close("incomplete" if event.reason is Finish.LENGTH else "completed")

    # --- items ---

    def _grow(self, kind: str, text: str) -> list[WireEvent]:
        events: list[WireEvent] = []
        if self._open is None or self._open["type"] != kind:
            if kind == "function_call":
                return []  # arguments of a call that was never started: nothing to add to
            events += self._close("completed")
            events += self._start(kind)
        assert self._open is not None
        self._text += text
        if kind == "function_call":
            events.append(self._at({"type": "response.function_call_arguments.delta",
                                    "delta": text}))
        else:
            events.append(self._at({"type": _DELTA[kind], "content_index": 0, "delta": text}))
            if kind == "message":
                events[-1]["logprobs"] = []
        return events

    def _start(self, kind: str) -> list[WireEvent]:
        item: Item = {"id": new_id(kind), "type": kind, "status": "in_progress"}
        if kind == "message":
            item.update(role="assistant", content=[])
        else:
            item.update(summary=[], content=[])
        self._open, self._text = item, ""
        self.items.append(item)
        added = {"type": "response.output_item.added", "output_index": self._index,
                 "item": _copy(item)}
        return [added, self._at({"type": "response.content_part.added", "content_index": 0,
                                 "part": _part(kind, "")})]

    def _open_call(self, event: ToolCallStart) -> list[WireEvent]:
        item: Item = {"id": new_id("function_call"), "type": "function_call",
                      "status": "in_progress", "call_id": event.id, "name": event.name,
                      "arguments": ""}
        self._open, self._text = item, ""
        self.items.append(item)
        return [{"type": "response.output_item.added", "output_index": self._index,
                 "item": _copy(item)}]

    def _done_call(self, event: ToolCallEvent) -> list[WireEvent]:
        if self._open is None or self._open.get("call_id") != event.call.id:
            return []
        self._text = event.call.arguments  # the arguments as parsed (a string decoded)
        return self._close("completed")

    def _close(self, status: str) -> list[WireEvent]:
        item, text = self._open, self._text
        if item is None:
            return []
        self._open, self._text = None, ""
        item["status"] = status
        kind = item["type"]
        if kind == "function_call":
            item["arguments"] = text
            return [self._at({"type": "response.function_call_arguments.done",
                              "arguments": text}, item),
                    {"type": "response.output_item.done", "output_index": self._index,
                     "item": _copy(item)}]
        part = _part(kind, text)
        item["content"] = [part]
        done = self._at({"type": _DONE[kind], "content_index": 0, "text": text}, item)
        if kind == "message":
            done["logprobs"] = []
        return [done,
                self._at({"type": "response.content_part.done", "content_index": 0,
                          "part": _copy(part)}, item),
                {"type": "response.output_item.done", "output_index": self._index,
                 "item": _copy(item)}]

    @property
    def _index(self) -> int:
        return len(self.items) - 1

    def _at(self, event: WireEvent, item: Item | None = None) -> WireEvent:
        """`event` about the open item (or `item`, the last one)."""
        target = item if item is not None else self._open
        assert target is not None
        return {**event, "item_id": target["id"], "output_index": self._index}


_DELTA = {"message": "response.output_text.delta", "reasoning": "response.reasoning_text.delta"}
_DONE = {"message": "response.output_text.done", "reasoning": "response.reasoning_text.done"}


def _part(kind: str, text: str) -> Item:
    if kind == "message":
        return {"type": "output_text", "text": text, "annotations": []}
    return {"type": "reasoning_text", "text": text}


def _copy(item: Item) -> Item:
    """A snapshot of an item for an event (the item itself keeps growing)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in item.items()}
