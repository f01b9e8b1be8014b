"""Model-native tool-call formats: which one a chat template speaks, the grammar that keeps a
call valid, and how a (partial) reply's calls are read.

A format owns the *call region* of a reply: the text from the marker that opens it
(`<tool_call>`, `[TOOL_CALLS]`, `<|python_tag|>`, or a JSON object that starts the reply) to the
end. `parse` reads the region as it grows, and may be called again on a longer text: what it
returns only ever grows (a call's name once known, its arguments' raw JSON text so far), so a
stream can send the difference. Formats:

- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, repeated (Hermes 2 Pro,
  Qwen 2.5, Qwen 3, SmolLM3 and most templates published since 2024);
- llama3: `{"name": ..., "parameters": {...}}` as the whole reply, or after `<|python_tag|>`
  (Llama 3.1-3.3 with custom tools);
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (Mistral v3 tokenizers:
  Mistral 7B v0.3, Nemo, Small);
- generic: Pensieve's own convention for templates that have no tool syntax (see `tools`): the
  whole reply is `{"tool_calls": [...]}` or `{"response": "..."}`.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from pensieve.api import tools
from pensieve.structured import grammar_for_json_schema

_WS = " \t\r\n"


class Malformed(ValueError):
    """The region is not in the format (a model writing freely can get it wrong)."""


@dataclass(slots=True)
class PartialCall:
    """A call as read so far: `args` is the raw JSON text of its arguments."""

    name: str | None = None
    args: str = ""
    args_is_string: bool = False  # arguments sent as a JSON-encoded string
    complete: bool = False


@dataclass(slots=True)
class Region:
    calls: list[PartialCall] = field(default_factory=list)
    content: str = ""  # text the region decodes to (the generic convention's `response`)
    complete: bool = False  # the region reached its end; what follows is not part of it


# --- reading partial JSON ---------------------------------------------------------------------


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _string_end(text: str, i: int) -> int | None:
    """The index after the JSON string that starts at `text[i] == '"'`, None when cut off."""
    j = i + 1
    n = len(text)
    while j < n:
        c = text[j]
        if c == "\\":
            j += 2
        elif c == '"':
            return j + 1
        else:
            j += 1
    return None


def value_end(text: str, i: int) -> int | None:
    """The index after the JSON value that starts at `text[i]`, None when it is cut off."""
    if i >= len(text):
        return None
    c = text[i]
    if c == '"':
        return _string_end(text, i)
    if c in "{[":
        depth, j, n = 0, i, len(text)
        while j < n:
            c = text[j]
            if c == '"':
                end = _string_end(text, j)
                if end is None:
                    return None
                j = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(text) and text[j] not in ",}] \t\r\n;":
        j += 1
    return j if j < len(text) else None


def partial_string(text: str) -> str:
    """The decoded content of a JSON string body cut off anywhere (no closing quote)."""
    cut = len(text)
    k = text.rfind("\\", max(0, cut - 6))
    if k >= 0:
        run = len(text[:k + 1]) - len(text[:k + 1].rstrip("\\"))
        tail = text[k + 1:]
        if run % 2 == 1 and (not tail or (tail[0] == "u" and len(tail) < 5)):
            cut = k  # an escape not finished yet
    try:
        value = json.loads(f'"{text[:cut]}"')
    except ValueError as exc:
        raise Malformed(f"not a JSON string: {text[:40]!r}") from exc
    return str(value)


def _key(text: str, i: int) -> tuple[str, int] | None:
    """The object key at `text[i]` and where its value starts; None when cut off before it."""
    if text[i] != '"':
        raise Malformed(f"expected a key at {text[i:i + 20]!r}")
    key_end = _string_end(text, i)
    if key_end is None:
        return None
    key = json.loads(text[i:key_end])
    j = _skip_ws(text, key_end)
    if j < len(text) and text[j] != ":":
        raise Malformed(f"expected ':' after {key!r}")
    j = _skip_ws(text, j + 1)
    return (key, j) if j < len(text) else None


def _object(text: str, i: int, names: tuple[str, ...],
            args_keys: tuple[str, ...]) -> tuple[PartialCall, int | None]:
    """The call object that starts at `text[i] == '{'`, and the index after it (None: cut off)."""
    call = PartialCall()
    j = i + 1
    while True:
        j = _skip_ws(text, j)
        if j >= len(text):
            return call, None
        if text[j] == "}":
            call.complete = call.name is not None
            if not call.complete:
                raise Malformed("a tool call without a name")
            return call, j + 1
        if text[j] == ",":
            j += 1
            continue
        entry = _key(text, j)
        if entry is None:
            return call, None
        key, j = entry
        end = value_end(text, j)
        if key in names:
            if end is not None:
                name = json.loads(text[j:end])
                if not isinstance(name, str) or not name:
                    raise Malformed("a tool call's name must be a string")
                call.name = name
        elif key in args_keys:
            call.args = text[j:end if end is not None else len(text)]
            call.args_is_string = text[j] == '"'
            if text[j] not in '{"':
                raise Malformed("a tool call's arguments must be a JSON object")
        if end is None:
            return call, None
        j = end


def final_arguments(call: PartialCall) -> str:
    """The arguments of a complete call as JSON text (decoded when sent as a string)."""
    if not call.args:
        return "{}"
    if call.args_is_string:
        inner = json.loads(call.args)
        return inner if isinstance(inner, str) else json.dumps(inner)
    return call.args


# --- the formats -------------------------------------------------------------------------------


class ToolFormat:
    """How one family of templates writes tool calls."""

    name = ""
    native = True  # the template renders tools and tool turns itself
    markers: tuple[str, ...] = ()  # strings that open the call region anywhere in the reply
    at_start = False  # a JSON object that begins the reply opens the region too
    args_key = "arguments"
    parallel = True

    def new_id(self) -> str:
        return f"call_{secrets.token_hex(12)}"

    def parse(self, region: str) -> Region:
        raise NotImplementedError

    def grammar(self, spec: tools.ToolSpec) -> str:
        """GBNF for the region (root), for a constrained reply or a lazy trigger."""
        raise NotImplementedError

    def triggers(self) -> tuple[str, ...]:
        """Regex patterns (llama.cpp's lazy grammar) that open the region under `auto`."""
        return tuple(re.escape(m) for m in self.markers)

    def call_grammar(self, spec: tools.ToolSpec) -> str:
        """GBNF whose rule `tc-call` is one call object to one of the offered tools."""
        schema = {"anyOf": [tools.call_schema(t, self.args_key) for t in spec.offered]}
        source = grammar_for_json_schema(schema)
        return re.sub(r"^root ::=", "tc-call ::=", source, flags=re.MULTILINE)

    def _calls(self, text: str, i: int, region: Region, sep: str, close: str) -> int | None:
        """Call objects from `text[i]`, separated by `sep`, up to `close`; the index after
        `close`, None when cut off."""
        while True:
            i = _skip_ws(text, i)
            if i >= len(text):
                return None
            if text[i] == close:
                return i + 1
            if text[i] == sep and region.calls:
                i += 1
                continue
            if text[i] != "{":
                raise Malformed(f"expected a call object at {text[i:i + 20]!r}")
            call, end = _object(text, i, ("name",), ("arguments", "parameters"))
            region.calls.append(call)
            if end is None:
                return None
            i = end


class Hermes(ToolFormat):
    name = "hermes"
    markers = ("<tool_call>",)
    _open, _close = "<tool_call>", "</tool_call>"

    def parse(self, region: str) -> Region:
        out = Region()
        i = 0
        while True:
            i = _skip_ws(region, i)
            if i >= len(region):
                return out
            if not region.startswith(self._open, i):
                if self._open.startswith(region[i:]):
                    return out  # the next call's marker, cut off
                out.complete = bool(out.calls)
                if not out.complete:
                    raise Malformed("expected <tool_call>")
                return out
            i = _skip_ws(region, i + len(self._open))
            if i >= len(region):
                return out
            if region[i] != "{":
                raise Malformed("expected a JSON object after <tool_call>")
            call, end = _object(region, i, ("name",), ("arguments", "parameters"))
            out.calls.append(call)
            if end is None:
                return out
            i = _skip_ws(region, end)
            rest = region[i:i + len(self._close)]
            if not self._close.startswith(rest):
                raise Malformed("expected </tool_call>")
            if len(rest) < len(self._close):
                return out
            i += len(self._close)

    def grammar(self, spec: tools.ToolSpec) -> str:
        one = '"<tool_call>" "\\n"? tc-call "\\n"? "</tool_call>"'
        more = ' ("\\n" "<tool_call>" "\\n"? tc-call "\\n"? "</tool_call>")*' if spec.parallel \
            else ""
        return f"root ::= {one}{more}\n{self.call_grammar(spec)}"


class Llama3(ToolFormat):
    name = "llama3"
    markers = ("<|python_tag|>",)
    at_start = True
    args_key = "parameters"
    parallel = False

    def parse(self, region: str) -> Region:
        out = Region()
        i = _skip_ws(region, 0)
        for marker in self.markers:
            if region.startswith(marker, i):
                i = _skip_ws(region, i + len(marker))
            elif marker.startswith(region[i:]):
                return out
        if i >= len(region):
            return out
        if region[i] != "{":
            raise Malformed("expected a JSON object")
        end = self._calls(region, i, out, ";", "\0")
        out.complete = end is not None
        return out

    def grammar(self, spec: tools.ToolSpec) -> str:
        return f"root ::= tc-call\n{self.call_grammar(spec)}"

    def triggers(self) -> tuple[str, ...]:
        # The whole reply so far is whitespace and the start of a call object.
        return (*super().triggers(), r'^\s*(\{\s*")[\s\S]*$')


class Mistral(ToolFormat):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)

    def new_id(self) -> str:  # Mistral's templates insist on nine letters and digits
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))

    def parse(self, region: str) -> Region:
        out = Region()
        marker = self.markers[0]
        if not region.startswith(marker):
            if marker.startswith(region):
                return out
            raise Malformed("expected [TOOL_CALLS]")
        i = _skip_ws(region, len(marker))
        if i >= len(region):
            return out
        if region[i] != "[":
            raise Malformed("expected a JSON array after [TOOL_CALLS]")
        out.complete = self._calls(region, i + 1, out, ",", "]") is not None
        return out

    def grammar(self, spec: tools.ToolSpec) -> str:
        more = ' ("," " "? tc-call)*' if spec.parallel else ""
        return f'root ::= "[TOOL_CALLS]" "[" tc-call{more} "]"\n{self.call_grammar(spec)}'


class Generic(ToolFormat):
    """Pensieve's convention (`tools`): the grammar holds from the first token."""

    name = "generic"
    native = False
    at_start = True

    def parse(self, region: str) -> Region:
        out = Region()
        i = _skip_ws(region, 0)
        if i >= len(region):
            return out
        if region[i] != "{":
            raise Malformed("expected a JSON object")
        i = _skip_ws(region, i + 1)
        entry = _key(region, i) if i < len(region) else None
        if entry is None:
            return out
        key, i = entry
        if key == "response" and region[i] == '"':
            end = _string_end(region, i)
            body = region[i + 1:end - 1] if end is not None else region[i + 1:]
            out.content = partial_string(body)
            out.complete = end is not None
            return out
        if key == "tool_calls" and region[i] == "[":
            out.complete = self._calls(region, i + 1, out, ",", "]") is not None
            return out
        raise Malformed(f"unexpected key {key!r}")

    def grammar(self, spec: tools.ToolSpec) -> str:
        return tools.grammar(spec)

    def triggers(self) -> tuple[str, ...]:
        return ()


FORMATS: tuple[ToolFormat, ...] = (Hermes(), Llama3(), Mistral())
GENERIC = Generic()


def detect(template: str | None) -> ToolFormat:
    """The format a chat template writes tool calls in; the generic convention when it has no
    tool syntax (no `tools` variable, or no format Pensieve can parse)."""
    if not template or "tools" not in template:
        return GENERIC
    for fmt in FORMATS:
        if any(m in template for m in fmt.markers):
            return fmt
    if "<|start_header_id|>" in template and "ipython" in template:
        return FORMATS[1]  # Llama 3.2-3.3 templates that take JSON calls without the tag
    return GENERIC


# --- what the template is given ---------------------------------------------------------------


def template_tools(spec: tools.ToolSpec) -> list[dict[str, Any]]:
    """The tools in the shape Hugging Face chat templates expect: all of them whatever the
    choice (the grammar enforces it), so the prompt stays the same when the choice changes."""
    return [{"type": "function",
             "function": {"name": t.name, "description": t.description,
                          "parameters": t.parameters or {"type": "object", "properties": {}}}}
            for t in spec.tools]


def template_calls(calls: tuple[tools.ToolCall, ...]) -> list[dict[str, Any]]:
    """An assistant turn's calls as Hugging Face templates expect them (arguments as an object,
    which most templates print with `tojson`)."""
    out = []
    for c in calls:
        try:
            args: Any = json.loads(c.arguments)
        except ValueError:
            args = c.arguments
        out.append({"id": c.id, "type": "function",
                    "function": {"name": c.name, "arguments": args}})
    return out
