"""Tool calling with a generic, grammar-constrained JSON convention (as llama-server's generic
format), for chat templates that have no tool convention of their own; family-neutral.

The tools are described in the system prompt; the model answers with one JSON object, either
`{"tool_calls": [{"name": ..., "arguments": {...}}]}` or `{"response": "..."}`. A grammar built
from the tools' parameter schemas enforces that shape, so arguments are always valid JSON (and
follow their schema where Pensieve can enforce it). The choice picks the alternatives: `auto`
both, `required` calls only, a named function calls to that function only (`none` offers no
tools at all: the family leaves the spec out).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pensieve.errors import InvalidRequest
from pensieve.structured import UnsupportedSchema, grammar_for_json_schema

log = logging.getLogger("pensieve.api.tools")

_INSTRUCTIONS = """You can call the following tools. Each is given as a JSON object with its name, \
description and the JSON schema of its arguments:
{tools}

Answer with one JSON object and nothing else. To call tools: \
{{"tool_calls": [{{"name": "<tool name>", "arguments": {{<arguments>}}}}]}}.{direct}"""
_DIRECT = ' To answer the user directly instead: {"response": "<your answer>"}.'


@dataclass(frozen=True, slots=True)
class ToolDef:
    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """Offered tools. `choice`: "auto", "required", or the one tool's name that must be called."""

    tools: tuple[ToolDef, ...]
    choice: str = "auto"
    parallel: bool = True

    @property
    def offered(self) -> tuple[ToolDef, ...]:
        if self.choice in ("auto", "required"):
            return self.tools
        return tuple(t for t in self.tools if t.name == self.choice)

    @property
    def may_answer(self) -> bool:
        return self.choice == "auto"


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


def validate(defs: Sequence[ToolDef], param: str = "tools") -> None:
    """400, naming the tool, when a tool's parameters are not a valid JSON schema (as a
    response_format schema would be); duplicate names are refused too. A valid schema that
    a grammar cannot enforce in full still works: its arguments are kept a JSON object."""
    from jsonschema import Draft202012Validator  # on first use: it costs start-up time
    from jsonschema.exceptions import SchemaError

    seen: set[str] = set()
    for i, tool in enumerate(defs):
        if tool.name in seen:
            raise InvalidRequest(f"Two tools are named {tool.name!r}; tool names must be "
                                 "unique.", param=f"{param}[{i}]")
        seen.add(tool.name)
        if tool.parameters is None:
            continue
        try:
            Draft202012Validator.check_schema(tool.parameters)
        except SchemaError as exc:
            where = "/".join(str(p) for p in exc.path) or "the top level"
            raise InvalidRequest(
                f"Tool {tool.name!r}: its parameters are not a valid JSON schema ({where}: "
                f"{exc.message}).", param=f"{param}[{i}]", code="invalid_tool_schema") from exc


# Template variables a request may not set: Pensieve fills them in.
_RESERVED = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})


def template_kwargs(given: dict[str, Any] | None, param: str) -> dict[str, Any]:
    """A request's extra chat-template variables (`chat_template_kwargs`), checked."""
    kwargs = dict(given or {})
    taken = sorted(_RESERVED & kwargs.keys())
    if taken:
        raise InvalidRequest(f"{param} may not set {', '.join(taken)}: Pensieve fills them in "
                             "from the request.", param=param)
    return kwargs


def with_instructions(messages: list[dict[str, Any]], spec: ToolSpec) -> list[dict[str, Any]]:
    """The template messages with the tools described in the (first) system message."""
    system = _system_text(spec)
    if messages and messages[0]["role"] in ("system", "developer"):
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{system}"},
                *messages[1:]]
    return [{"role": "system", "content": system}, *messages]


def render_turn(role: str, content: str, calls: tuple[ToolCall, ...],
                call_id: str | None) -> dict[str, Any]:
    """A past call (assistant) or a call's result (tool) as a template message."""
    if role == "tool":
        reply = {"tool_call_id": call_id, "content": _loads_or_text(content)}
        return {"role": "tool", "content": json.dumps({"tool_response": reply})}
    past = [{"name": c.name, "arguments": _loads_or_text(c.arguments)} for c in calls]
    return {"role": role, "content": json.dumps({"tool_calls": past})}


def arguments_object(arguments: str) -> dict[str, Any]:
    """A call's arguments as a JSON object, for families that send them as one (Anthropic's
    `input`, Ollama's `arguments`); arguments that are not an object come as `arguments`."""
    value = _loads_or_text(arguments)
    return value if isinstance(value, dict) else {"arguments": value}


def _loads_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _system_text(spec: ToolSpec) -> str:
    described = [{"name": t.name, "description": t.description,
                  "parameters": t.parameters or {"type": "object"}} for t in spec.tools]
    # The same text whatever the choice (the grammar enforces it), so that a conversation that
    # switches between `required` and `auto` keeps its prefix in memory.
    return _INSTRUCTIONS.format(tools="\n".join(json.dumps(t) for t in described),
                                direct=_DIRECT)


def grammar(spec: ToolSpec) -> str:
    """GBNF for the reply: tool calls (and, under `auto`, a direct response)."""
    call_array: dict[str, Any] = {
        "type": "array", "minItems": 1,
        "items": {"anyOf": [call_schema(t) for t in spec.offered]},
    }
    if not spec.parallel:
        call_array["maxItems"] = 1
    calls = {"type": "object", "properties": {"tool_calls": call_array},
             "required": ["tool_calls"]}
    if not spec.may_answer:
        return grammar_for_json_schema(calls)
    response = {"type": "object", "properties": {"response": {"type": "string"}},
                "required": ["response"]}
    return grammar_for_json_schema({"anyOf": [calls, response]})


def call_schema(tool: ToolDef, args_key: str = "arguments") -> dict[str, Any]:
    """The JSON schema of one call to `tool`: its name, and its arguments under `args_key`."""
    params = tool.parameters or {"type": "object"}
    try:
        grammar_for_json_schema(params)
    except UnsupportedSchema as exc:
        # Arguments still come out as a valid JSON object; only this schema's detail is lost.
        log.warning("tool %r: %s; its arguments are constrained to any JSON object",
                    tool.name, exc.message)
        params = {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": tool.name}, args_key: params},
            "required": ["name", args_key]}
