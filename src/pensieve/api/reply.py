"""Reads a reply as it streams: reasoning, answer text and tool calls, apart.

`ReplyParser.feed(text)` takes each piece the engine decodes and returns the parts it can tell
apart so far; `close()` returns the rest when the reply ends. Text that might be the start of a
marker (`<thi`, `<tool_c`) is held back until the next piece settles it, so nothing that belongs
to reasoning or a call ever reaches the answer text.

- Reasoning: a reply that opens with a start marker (`<think>`, or the template's own), or whose
  prompt already opened one (Qwen 3, DeepSeek R1 templates), is reasoning up to the end marker.
- Tool calls: from the format's marker (or, for formats whose calls are the whole reply, a JSON
  object at the start) to the end, the format reads the calls; each call's name goes out as soon
  as it is known and its arguments as they are generated. A region the format cannot read (a
  model writing freely can get it wrong, or run out of tokens) ends up as answer text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pensieve.api import tools
from pensieve.api.tool_formats import Malformed, PartialCall, ToolFormat, final_arguments

# (start, end) reasoning markers, the first found in the template is the model's.
THINK_MARKERS: tuple[tuple[str, str], ...] = (
    ("<think>", "</think>"),
    ("<|START_THINKING|>", "<|END_THINKING|>"),
    ("[THINK]", "[/THINK]"),
    ("<seed:think>", "</seed:think>"),
)


def think_markers(template: str | None) -> tuple[str, str]:
    for pair in THINK_MARKERS:
        if template and pair[0] in template:
            return pair
    return THINK_MARKERS[0]


def opens_reasoning(prompt: str, markers: tuple[str, str]) -> bool:
    """Whether the rendered prompt ends inside a reasoning block the template opened."""
    return prompt.rstrip().endswith(markers[0])


@dataclass(frozen=True, slots=True)
class Content:
    text: str


@dataclass(frozen=True, slots=True)
class Reasoning:
    text: str


@dataclass(frozen=True, slots=True)
class CallStart:
    position: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class CallArgs:
    position: int
    text: str


@dataclass(frozen=True, slots=True)
class CallDone:
    position: int
    call: tools.ToolCall


Part = Content | Reasoning | CallStart | CallArgs | CallDone


class _Mode(enum.Enum):
    START = "start"  # only whitespace so far: reasoning or a call may still open
    REASONING = "reasoning"
    CONTENT = "content"
    REGION = "region"


@dataclass(slots=True)
class _Sent:
    """What went out of one call."""

    id: str
    name_sent: bool = False
    args_sent: int = 0
    done: bool = False


class ReplyParser:
    """One choice's reply. `fmt` None: no tools offered; `think` None: reasoning kept raw."""

    def __init__(self, fmt: ToolFormat | None, think: tuple[str, str] | None,
                 in_reasoning: bool = False) -> None:
        self._fmt = fmt
        self._think = think
        self._mode = _Mode.REASONING if (think and in_reasoning) else _Mode.START
        self._pending = ""
        self._region = ""
        self._region_content = 0  # characters of the region's own content sent
        self._sent: list[_Sent] = []
        self._markers = fmt.markers if fmt is not None else ()
        self._after_reasoning = False
        self._reasoning_started = False

    @property
    def in_reasoning(self) -> bool:
        return self._mode is _Mode.REASONING

    @property
    def num_calls(self) -> int:
        return sum(s.done for s in self._sent)

    def feed(self, text: str) -> list[Part]:
        if self._mode is _Mode.CONTENT and not self._markers and not self._pending:
            return [Content(text)] if text else []  # the common case, kept cheap
        if self._mode is _Mode.REGION:
            self._region += text
            return self._region_parts(final=False)
        self._pending += text
        parts: list[Part] = []
        while self._pending and self._step(parts):
            pass
        return parts

    def close(self) -> list[Part]:
        parts: list[Part] = []
        if self._mode is _Mode.REGION:
            return self._region_parts(final=True)
        if self._pending:
            text, self._pending = self._pending, ""
            if self._mode is _Mode.REASONING:
                text = text.rstrip() if self._reasoning_started else text.strip()
                parts.extend([Reasoning(text)] if text else [])
            elif self._mode is _Mode.START and self._after_reasoning:
                parts.extend(_content(text.lstrip()))
            else:
                parts.append(Content(text))
        return parts

    # --- text outside the call region ---

    def _step(self, parts: list[Part]) -> bool:
        """Move on from `_pending` as far as it can be told apart; False: wait for more."""
        if self._mode is _Mode.START:
            return self._start(parts)
        if self._mode is _Mode.REASONING:
            return self._reasoning(parts)
        # CONTENT: look for a call marker
        best = min(((k, m) for m in self._markers if (k := self._pending.find(m)) >= 0),
                   default=None)
        if best is None:
            keep = _partial_suffix(self._pending, self._markers)
            text = self._pending[:len(self._pending) - keep]
            self._pending = self._pending[len(text):]
            parts.extend([Content(text)] if text else [])
            return False
        k = best[0]
        parts.extend([Content(self._pending[:k])] if k else [])
        self._open_region(self._pending[k:], parts)
        return False

    def _reasoning(self, parts: list[Part]) -> bool:
        """Reasoning up to the end marker, without the white space around it (templates open
        with `<think>\n`): leading white space is dropped, trailing held until text follows."""
        assert self._think is not None
        if not self._reasoning_started:
            self._pending = self._pending.lstrip()
            self._reasoning_started = bool(self._pending)
        end = self._think[1]
        k = self._pending.find(end)
        if k < 0:
            partial = _partial_suffix(self._pending, (end,))
            text = self._pending[:len(self._pending) - partial].rstrip()
            self._pending = self._pending[len(text):]
            parts.extend([Reasoning(text)] if text else [])
            return False
        text = self._pending[:k].rstrip()
        parts.extend([Reasoning(text)] if text else [])
        self._pending = self._pending[k + len(end):]
        self._mode, self._after_reasoning = _Mode.START, True
        return True

    def _start(self, parts: list[Part]) -> bool:
        body = self._pending.lstrip()
        if not body:
            return False
        opens: list[str] = []
        if self._think is not None and not self._after_reasoning:
            opens.append(self._think[0])
        if self._fmt is not None:
            opens.extend(self._fmt.markers)
            if self._fmt.at_start:
                opens.append("{")
        if any(m.startswith(body) and m != body for m in opens):
            return False  # maybe a marker: wait
        if self._think is not None and not self._after_reasoning \
                and body.startswith(self._think[0]):
            self._pending = body[len(self._think[0]):]
            self._mode = _Mode.REASONING
            return True
        if self._fmt is not None and self._fmt.at_start and body.startswith("{"):
            self._open_region(body, parts)
            return False
        if self._after_reasoning:
            self._pending = body  # the answer after reasoning starts at its first word
        self._mode = _Mode.CONTENT
        return True

    def _open_region(self, text: str, parts: list[Part]) -> None:
        self._mode, self._pending, self._region = _Mode.REGION, "", text
        parts.extend(self._region_parts(final=False))

    # --- the call region ---

    def _region_parts(self, *, final: bool) -> list[Part]:
        assert self._fmt is not None
        try:
            region = self._fmt.parse(self._region)
        except Malformed:
            return self._fallback(final)
        parts: list[Part] = []
        if len(region.content) > self._region_content:
            parts.append(Content(region.content[self._region_content:]))
            self._region_content = len(region.content)
        for position, call in enumerate(region.calls):
            parts.extend(self._call_parts(position, call, final))
        if final and not any(s.name_sent for s in self._sent) and not region.content \
                and not region.complete and self._region.strip():
            parts.extend(self._fallback(final))  # cut off before any call could be read
        return parts

    def _call_parts(self, position: int, call: PartialCall, final: bool) -> list[Part]:
        assert self._fmt is not None
        if position == len(self._sent):
            self._sent.append(_Sent(self._fmt.new_id()))
        sent = self._sent[position]
        parts: list[Part] = []
        if call.name is None or sent.done:
            return parts
        if not sent.name_sent:
            sent.name_sent = True
            parts.append(CallStart(position, sent.id, call.name))
        if not call.args_is_string and len(call.args) > sent.args_sent:
            parts.append(CallArgs(position, call.args[sent.args_sent:]))
            sent.args_sent = len(call.args)
        if call.complete:
            sent.done = True
            args = final_arguments(call)
            if call.args_is_string or not call.args:
                parts.append(CallArgs(position, args))
            parts.append(CallDone(position, tools.ToolCall(sent.id, call.name, args)))
        return parts

    def _fallback(self, final: bool) -> list[Part]:
        """A region the format cannot read: its text is the answer's (once nothing of it has
        gone out as a call)."""
        if any(s.name_sent for s in self._sent):
            return []
        if not final:
            return []  # the region may still turn out readable: wait for the end
        text, self._region = self._region, ""
        self._mode = _Mode.CONTENT
        return [Content(text)] if text else []


def _content(text: str) -> list[Part]:
    return [Content(text)] if text else []


def _partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that begins one of the markers."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best
