"""Anthropic content blocks, read into family-neutral chat turns.

    user:      text...  tool_result...   ->  Turn("tool", ...) per result, Turn("user", text)
    assistant: thinking? text... tool_use... ->  Turn("assistant", text, tool_calls=...)

Thinking blocks sent back in assistant turns are dropped from the prompt (reasoning models'
templates drop past reasoning too). Call ids go out as `toolu_<engine id>` and come back with
that prefix taken off, so a template that prints ids (Mistral's nine characters) gets its own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Field

from pensieve.api.base import StrictBody
from pensieve.api.generation import Turn
from pensieve.api.tools import ToolCall
from pensieve.errors import InvalidRequest

MAX_TEXT = 1 << 24
ID_PREFIX = "toolu_"


class TextBlock(StrictBody):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT)
    cache_control: dict[str, Any] | None = None  # Pensieve remembers every prompt anyway


class OtherBlock(StrictBody):
    """Blocks a text-only model cannot take; refused with a clear message."""

    type: Literal["image", "document", "server_tool_use", "web_search_tool_result",
                  "search_result", "container_upload"]


class ToolUseBlock(StrictBody):
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


ResultPart = Annotated[TextBlock | OtherBlock, Field(discriminator="type")]


class ToolResultBlock(StrictBody):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    content: str | list[ResultPart] | dict[str, Any] | None = None
    is_error: bool = False
    cache_control: dict[str, Any] | None = None

    def text(self, param: str) -> str:
        """The result as the model reads it; an error says so."""
        if self.content is None:
            text = ""
        elif isinstance(self.content, dict):
            text = json.dumps(self.content, ensure_ascii=False)
        else:
            text = blocks_text(self.content, param)
        return f"Error: {text}" if self.is_error else text


class ThinkingBlock(StrictBody):
    type: Literal["thinking", "redacted_thinking"]
    thinking: str | None = Field(None, max_length=MAX_TEXT)
    signature: str | None = None
    data: str | None = None  # redacted_thinking's


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | OtherBlock,
                  Field(discriminator="type")]


def blocks_text(content: str | Sequence[Block | ResultPart], param: str) -> str:
    """Text content: a string or text blocks; any other block is a 400."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if not isinstance(block, TextBlock):
            raise InvalidRequest(f"Content blocks of type {block.type!r} are not supported "
                                 "here: this model reads text only. Send text blocks.",
                                 param=param, code="unsupported_content")
        parts.append(block.text)
    return "".join(parts)


def user_turns(content: str | list[Block], param: str) -> list[Turn]:
    """A user message: each tool_result a `tool` turn, in order, and its text a user turn."""
    if isinstance(content, str):
        return [Turn("user", content)]
    turns: list[Turn] = []
    text: list[Block] = []
    for block in content:
        if isinstance(block, ToolResultBlock):
            turns.append(Turn("tool", block.text(param), tool_call_id=engine_id(block.tool_use_id)))
        elif isinstance(block, ToolUseBlock | ThinkingBlock):
            raise InvalidRequest(f"A user message cannot hold {block.type} blocks; they belong "
                                 "to assistant messages.", param=param)
        else:
            text.append(block)  # anything but text is refused by blocks_text
    if text or not turns:
        turns.append(Turn("user", blocks_text(text, param)))
    return turns


def assistant_turn(content: str | list[Block], param: str) -> Turn:
    """An assistant message: its text and its tool calls; thinking blocks are dropped."""
    if isinstance(content, str):
        return Turn("assistant", content)
    calls = tuple(ToolCall(engine_id(b.id), b.name, json.dumps(b.input, ensure_ascii=False))
                  for b in content if isinstance(b, ToolUseBlock))
    if any(isinstance(b, ToolResultBlock) for b in content):
        raise InvalidRequest("An assistant message cannot hold tool_result blocks; send them "
                             "in the user message after it.", param=param)
    kept = [b for b in content if not isinstance(b, ToolUseBlock | ThinkingBlock)]
    return Turn("assistant", blocks_text(kept, param), calls)


def engine_id(call_id: str) -> str:
    return call_id.removeprefix(ID_PREFIX)


def anthropic_id(call_id: str) -> str:
    return f"{ID_PREFIX}{call_id}"


def merge_same_role(turns: list[Turn]) -> list[Turn]:
    """Consecutive plain turns of one role become one, as the Messages API specifies; calls
    and their results stay turns of their own."""
    merged: list[Turn] = []
    for turn in turns:
        last = merged[-1] if merged else None
        if last is not None and last.role == turn.role != "tool" \
                and not last.tool_calls and not turn.tool_calls:
            merged[-1] = Turn(turn.role, last.content + "\n\n" + turn.content)
        else:
            merged.append(turn)
    return merged
