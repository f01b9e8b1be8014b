"""Reading replies as they stream: reasoning, answer text and native tool calls, apart.

Each case feeds a reply in pieces (every split point, or one character at a time) and checks
that what comes out is the same whatever the split: the parser must never depend on where
the engine's detokenizer happened to cut the text.
"""

from __future__ import annotations

import json

import pytest

from pensieve.api import tool_formats
from pensieve.api.reply import (
    CallArgs,
    CallDone,
    CallStart,
    Content,
    Part,
    Reasoning,
    ReplyParser,
    opens_reasoning,
    think_markers,
)
from pensieve.api.tool_formats import GENERIC, Hermes, Llama3, Malformed, Mistral
from pensieve.api.tools import ToolDef, ToolSpec

THINK = ("<think>", "</think>")


def _run(fmt: tool_formats.ToolFormat | None, pieces: list[str], *, think=THINK,
         opened: bool = False) -> list[Part]:
    parser = ReplyParser(fmt, think, opened)
    parts: list[Part] = []
    for piece in pieces:
        parts.extend(parser.feed(piece))
    parts.extend(parser.close())
    return parts


def _summary(parts: list[Part]) -> dict:
    """What a client would assemble: answer, reasoning, and each call's name and arguments."""
    out: dict = {"content": "", "reasoning": "", "calls": {}, "done": []}
    for p in parts:
        if isinstance(p, Content):
            out["content"] += p.text
        elif isinstance(p, Reasoning):
            out["reasoning"] += p.text
        elif isinstance(p, CallStart):
            out["calls"][p.position] = [p.name, ""]
        elif isinstance(p, CallArgs):
            out["calls"][p.position][1] += p.text
        elif isinstance(p, CallDone):
            out["done"].append((p.call.name, json.loads(p.call.arguments)))
    return out


def _every_split(fmt, text: str, **kw) -> dict:
    """The same summary for the whole text at once, each two-way split and char by char."""
    whole = _summary(_run(fmt, [text], **kw))
    for k in range(1, len(text)):
        assert _summary(_run(fmt, [text[:k], text[k:]], **kw)) == whole, k
    assert _summary(_run(fmt, list(text), **kw)) == whole
    return whole


def test_plain_text_passes_through() -> None:
    assert _every_split(None, "Hello <b>there</b> {x}") == {
        "content": "Hello <b>there</b> {x}", "reasoning": "", "calls": {}, "done": []}


def test_reasoning_is_split_from_the_answer() -> None:
    got = _every_split(None, "<think>Let me see: 2+2.</think>\n\nIt is 4.")
    assert got["reasoning"] == "Let me see: 2+2." and got["content"] == "It is 4."


def test_reasoning_opened_by_the_prompt() -> None:
    got = _every_split(None, "hmm, 4.</think>Four.", opened=True)
    assert got["reasoning"] == "hmm, 4." and got["content"] == "Four."


def test_reasoning_cut_off_stays_reasoning() -> None:
    got = _every_split(None, "<think>still thinking <")
    assert got["reasoning"] == "still thinking <" and got["content"] == ""


def test_think_marker_not_at_the_start_is_text() -> None:
    got = _every_split(None, "Use <think> tags.")
    assert got["content"] == "Use <think> tags." and got["reasoning"] == ""


def test_raw_reasoning_when_split_is_off() -> None:
    got = _every_split(None, "<think>a</think>b", think=None)
    assert got["content"] == "<think>a</think>b"


def test_template_markers_and_open_prompts() -> None:
    assert think_markers("... [THINK] ...") == ("[THINK]", "[/THINK]")
    assert think_markers(None) == THINK
    assert opens_reasoning("<|im_start|>assistant\n<think>\n", THINK)
    assert not opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n", THINK)


HERMES_TWO = ('Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
              '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n'
              '</tool_call>')


def test_hermes_text_then_two_calls() -> None:
    got = _every_split(Hermes(), HERMES_TWO)
    assert got["content"] == "Checking."
    assert got["done"] == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert got["calls"][0] == ["get_weather", '{"city": "Paris"}']


def test_hermes_arguments_stream_before_the_call_ends() -> None:
    parts = _run(Hermes(), list(HERMES_TWO))
    starts = [i for i, p in enumerate(parts) if isinstance(p, CallStart)]
    args = [i for i, p in enumerate(parts) if isinstance(p, CallArgs) and p.position == 0]
    done = [i for i, p in enumerate(parts) if isinstance(p, CallDone)]
    assert len(args) > 3 and starts[0] < args[0] and args[-1] < done[0]


def test_reasoning_then_a_call() -> None:
    text = '<think>need weather</think>\n<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    got = _every_split(Hermes(), text)
    assert got["reasoning"] == "need weather" and got["content"] == ""
    assert got["done"] == [("f", {})]


def test_malformed_call_is_kept_as_text() -> None:
    text = "Sure <tool_call>{name: oops}</tool_call> done"
    got = _every_split(Hermes(), text)
    assert got["content"] == text and got["done"] == []


def test_call_cut_off_before_its_name_is_kept_as_text() -> None:
    got = _every_split(Hermes(), 'Hi <tool_call>{"na')
    assert got["content"] == 'Hi <tool_call>{"na'


def test_arguments_sent_as_a_string_are_decoded() -> None:
    text = '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
    got = _every_split(Hermes(), text)
    assert got["done"] == [("f", {"a": 1})] and got["calls"][0] == ["f", '{"a": 1}']


def test_llama3_json_reply_and_python_tag() -> None:
    got = _every_split(Llama3(), '{"name": "f", "parameters": {"x": [1, {"y": "}"}]}}')
    assert got["done"] == [("f", {"x": [1, {"y": "}"}]})] and got["content"] == ""
    got = _every_split(Llama3(), '<|python_tag|>{"name": "g", "parameters": {}}')
    assert got["done"] == [("g", {})]
    assert _every_split(Llama3(), "No call.")["content"] == "No call."


def test_mistral_parallel_calls() -> None:
    text = '[TOOL_CALLS][{"name": "a", "arguments": {"q": 1}}, {"name": "b", "arguments": {}}]'
    got = _every_split(Mistral(), text)
    assert got["done"] == [("a", {"q": 1}), ("b", {})]
    assert len(Mistral().new_id()) == 9


def test_generic_convention_streams_the_response_text() -> None:
    got = _every_split(GENERIC, '{"response": "Caf\\u00e9 \\"ok\\"\\n"}')
    assert got["content"] == 'Café "ok"\n'
    got = _every_split(GENERIC, '{"tool_calls": [{"name": "f", "arguments": {"a": "b"}}]}')
    assert got["done"] == [("f", {"a": "b"})]


def test_partial_json_helpers() -> None:
    assert tool_formats.value_end('{"a": "}"} tail', 0) == 10
    assert tool_formats.value_end('{"a": [1, 2', 0) is None
    assert tool_formats.partial_string("ab\\") == "ab"
    assert tool_formats.partial_string("ab\\u00") == "ab"
    with pytest.raises(Malformed):
        Hermes().parse("<tool_call>[1]</tool_call>")


SPEC = ToolSpec((ToolDef("get_weather", "", {"type": "object",
                                              "properties": {"city": {"type": "string"}},
                                              "required": ["city"]}),))


@pytest.mark.parametrize("fmt", [Hermes(), Llama3(), Mistral()])
def test_grammars_have_one_root_and_the_call_rule(fmt: tool_formats.ToolFormat) -> None:
    # (llama.cpp itself parses them in tests/e2e/test_agent_tools.py, with the real model)
    grammar = fmt.grammar(SPEC)
    rules = [line.split(" ::=")[0] for line in grammar.splitlines() if " ::=" in line]
    assert rules.count("root") == 1 and rules.count("tc-call") == 1
    assert "get_weather" in grammar and fmt.triggers()


def test_detect_formats_from_templates() -> None:
    assert tool_formats.detect("{% if tools %}<tool_call>{% endif %}").name == "hermes"
    assert tool_formats.detect("{% if tools %}[TOOL_CALLS]{% endif %}").name == "mistral"
    assert tool_formats.detect("{{ tools }}<|python_tag|>").name == "llama3"
    assert tool_formats.detect("<|im_start|>{{ m }}") is GENERIC
    assert tool_formats.detect(None) is GENERIC


def test_white_space_around_reasoning_is_dropped() -> None:
    got = _every_split(None, "<think>\nhmm, 4 \n</think>\n\nFour.")
    assert (got["reasoning"], got["content"]) == ("hmm, 4", "Four.")
    got = _every_split(None, "\n  a b\n</think>c", opened=True)
    assert (got["reasoning"], got["content"]) == ("a b", "c")
