"""The generic tool convention without the model: prompts, grammars, parsing."""

from __future__ import annotations

import json

import pytest

from pensieve.api.openai.protocol import ChatCompletionRequest
from pensieve.api.openai.tools import parse_reply, render_messages, tool_grammar

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


def test_tools_go_into_a_system_message() -> None:
    messages = render_messages(_body())
    assert messages[0]["role"] == "system" and "get_weather" in messages[0]["content"]
    assert '"response"' in messages[0]["content"]  # auto may answer directly
    assert "send_mail" in messages[0]["content"]


def test_named_choice_offers_only_that_tool_and_no_direct_answer() -> None:
    body = _body(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    system = render_messages(body)[0]["content"]
    assert "send_mail" not in system and '"response"' not in system
    grammar = tool_grammar(body)
    assert "get_weather" in grammar and "send_mail" not in grammar and "response" not in grammar


def test_none_leaves_tools_out() -> None:
    assert render_messages(_body(tool_choice="none")) == [{"role": "user", "content": "hi"}]


def test_past_calls_and_results_are_rendered_as_json() -> None:
    body = _body(messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "cold"}])
    rendered = render_messages(body)
    assert json.loads(rendered[2]["content"]) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}
    assert json.loads(rendered[3]["content"]) == {
        "tool_response": {"tool_call_id": "call_1", "content": "cold"}}


def test_replies_parse_into_calls_or_content() -> None:
    calls = parse_reply('{"tool_calls": [{"name": "f", "arguments": {"a": 1}}]}')
    assert calls.content is None
    assert calls.tool_calls[0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert calls.tool_calls[0]["id"].startswith("call_")
    assert parse_reply('{"response": "hello"}').content == "hello"
    assert parse_reply('{"tool_calls": [{"na').content == '{"tool_calls": [{"na'


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_tool_choice_needs_tools(choice: str) -> None:
    with pytest.raises(ValueError):
        ChatCompletionRequest.model_validate({"model": "m", "tool_choice": choice,
                                              "messages": [{"role": "user", "content": "x"}]})
