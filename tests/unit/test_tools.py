"""The generic tool convention without the model: prompts, grammars, parsing."""

from __future__ import annotations

import json

import pytest

from pensieve.api.openai.protocol import ChatCompletionRequest
from pensieve.api.tools import ToolSpec, grammar, parse_reply, render_turn, with_instructions

TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}
ODD = {"type": "function", "function": {
    "name": "send_mail", "parameters": {"type": "object",
                                        "properties": {"to": {"type": "string",
                                                              "format": "email"}}}}}


def _body(**kwargs) -> ChatCompletionRequest:
    args = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [TOOL, ODD]}
    return ChatCompletionRequest.model_validate({**args, **kwargs})


def _spec(**kwargs) -> ToolSpec:
    spec = _body(**kwargs).tool_spec()
    assert spec is not None
    return spec


def render_messages(spec: ToolSpec) -> list[dict]:
    return with_instructions([{"role": "user", "content": "hi"}], spec)


def test_tools_go_into_a_system_message() -> None:
    messages = render_messages(_spec())
    assert messages[0]["role"] == "system" and "get_weather" in messages[0]["content"]
    assert '"response"' in messages[0]["content"]  # auto may answer directly
    assert "send_mail" in messages[0]["content"]


def test_named_choice_offers_only_that_tool_and_no_direct_answer() -> None:
    spec = _spec(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    system = render_messages(spec)[0]["content"]
    assert "send_mail" not in system and '"response"' not in system
    gbnf = grammar(spec)
    assert "get_weather" in gbnf and "send_mail" not in gbnf and "response" not in gbnf


def test_none_leaves_tools_out() -> None:
    assert _body(tool_choice="none").tool_spec() is None


def test_past_calls_and_results_are_rendered_as_json() -> None:
    body = _body(messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "cold"}])
    rendered = [render_turn(m.role, m.content, m.tool_calls, m.tool_call_id)
                for m in (msg.to_message() for msg in body.messages)]
    assert json.loads(rendered[1]["content"]) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}
    assert json.loads(rendered[2]["content"]) == {
        "tool_response": {"tool_call_id": "call_1", "content": "cold"}}


def test_replies_parse_into_calls_or_content() -> None:
    calls = parse_reply('{"tool_calls": [{"name": "f", "arguments": {"a": 1}}]}')
    assert calls.content is None
    assert (calls.tool_calls[0].name, calls.tool_calls[0].arguments) == ("f", '{"a": 1}')
    assert calls.tool_calls[0].id.startswith("call_")
    assert parse_reply('{"response": "hello"}').content == "hello"
    assert parse_reply('{"tool_calls": [{"na').content == '{"tool_calls": [{"na'


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_tool_choice_needs_tools(choice: str) -> None:
    with pytest.raises(ValueError):
        ChatCompletionRequest.model_validate({"model": "m", "tool_choice": choice,
                                              "messages": [{"role": "user", "content": "x"}]})
