"""Tool calling with a generic, grammar-constrained JSON convention (as llama-server's generic
format), for chat templates that have no tool convention of their own.

The tools are described in the system prompt; the model answers with one JSON object, either
`{"tool_calls": [{"name": ..., "arguments": {...}}]}` or `{"response": "..."}`. A grammar built
from the tools' parameter schemas enforces that shape, so arguments are always valid JSON (and
follow their schema where Pensieve can enforce it). `tool_choice` picks the alternatives:
`auto` both, `required` calls only, a named function calls to that function only.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from pensieve.api.openai.protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice, Tool
from pensieve.structured import UnsupportedSchema, grammar_for_json_schema

log = logging.getLogger("pensieve.api.openai.tools")

_INSTRUCTIONS = """You can call the following tools. Each is given as a JSON object with its name, \
description and the JSON schema of its arguments:
{tools}

Answer with one JSON object and nothing else. To call tools: \
{{"tool_calls": [{{"name": "<tool name>", "arguments": {{<arguments>}}}}]}}.{direct}"""
_DIRECT = ' To answer the user directly instead: {"response": "<your answer>"}.'


@dataclass(frozen=True, slots=True)
class ParsedReply:
    """One choice's output, read under the tool convention."""

    content: str | None
    tool_calls: list[dict[str, Any]]


def render_messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The chat history as template messages, with tools and past calls in the convention."""
    messages = [_render_message(m) for m in body.messages]
    if not body.uses_tools():
        return messages
    system = _system_text(body)
    if messages and messages[0]["role"] in ("system", "developer"):
        messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{system}"}
    else:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _render_message(m: ChatMessage) -> dict[str, Any]:
    if m.role == "assistant" and m.tool_calls:
        calls = [{"name": c.function.name, "arguments": _loads_or_text(c.function.arguments)}
                 for c in m.tool_calls]
        return {"role": "assistant", "content": json.dumps({"tool_calls": calls})}
    if m.role == "tool":
        reply = {"tool_call_id": m.tool_call_id, "content": _loads_or_text(m.text())}
        return {"role": "tool", "content": json.dumps({"tool_response": reply})}
    return {"role": m.role, "content": m.text()}


def _loads_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _system_text(body: ChatCompletionRequest) -> str:
    tools = [{"name": t.function.name, "description": t.function.description or "",
              "parameters": t.function.parameters or {"type": "object"}}
             for t in _offered(body)]
    direct = _DIRECT if body.tool_choice in (None, "auto") else ""
    return _INSTRUCTIONS.format(tools="\n".join(json.dumps(t) for t in tools), direct=direct)


def _offered(body: ChatCompletionRequest) -> list[Tool]:
    tools = body.tools or []
    if isinstance(body.tool_choice, NamedToolChoice):
        return [t for t in tools if t.function.name == body.tool_choice.function.name]
    return tools


def tool_grammar(body: ChatCompletionRequest) -> str:
    """GBNF for the reply: tool calls (and, under `auto`, a direct response)."""
    call_array: dict[str, Any] = {
        "type": "array", "minItems": 1,
        "items": {"anyOf": [_call_schema(t) for t in _offered(body)]},
    }
    if not body.parallel_tool_calls:
        call_array["maxItems"] = 1
    calls = {"type": "object", "properties": {"tool_calls": call_array},
             "required": ["tool_calls"]}
    if body.tool_choice not in (None, "auto"):
        return grammar_for_json_schema(calls)
    response = {"type": "object", "properties": {"response": {"type": "string"}},
                "required": ["response"]}
    return grammar_for_json_schema({"anyOf": [calls, response]})


def _call_schema(tool: Tool) -> dict[str, Any]:
    params = tool.function.parameters or {"type": "object"}
    try:
        grammar_for_json_schema(params)
    except UnsupportedSchema as exc:
        # Arguments still come out as a valid JSON object; only this schema's detail is lost.
        log.warning("tool %r: %s; its arguments are constrained to any JSON object",
                    tool.function.name, exc.message)
        params = {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": tool.function.name},
                                             "arguments": params},
            "required": ["name", "arguments"]}


def parse_reply(text: str) -> ParsedReply:
    """Read a reply: tool calls, a direct response, or (not in the convention) plain text."""
    try:
        data = json.loads(text)
    except ValueError:
        return ParsedReply(text, [])
    if isinstance(data, dict) and isinstance(data.get("tool_calls"), list):
        calls = [_openai_call(c) for c in data["tool_calls"] if isinstance(c, dict)]
        return ParsedReply(None, calls)
    if isinstance(data, dict) and isinstance(data.get("response"), str):
        return ParsedReply(data["response"], [])
    return ParsedReply(text, [])


def _openai_call(call: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": str(call.get("name", "")),
                         "arguments": json.dumps(call.get("arguments", {}))}}
