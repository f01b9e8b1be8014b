"""The generic tool convention without the model: prompts, grammars, parsing."""

from __future__ import annotations

import json

import pytest

from pensieve.api.openai.protocol import ChatCompletionRequest
from pensieve.api.tools import ToolSpec, grammar, render_turn, with_instructions

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


def test_the_choice_is_the_grammars_and_the_prompt_stays_the_same() -> None:
    """`required` or a named tool constrain the grammar only: the prompt is the same under
    every choice, so a conversation that switches (an agent asks `required`, then `auto`)
    keeps its whole prefix in memory."""
    spec = _spec(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert render_messages(spec) == render_messages(_spec()) \
        == render_messages(_spec(tool_choice="required"))
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


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_tool_choice_needs_tools(choice: str) -> None:
    with pytest.raises(ValueError):
        ChatCompletionRequest.model_validate({"model": "m", "tool_choice": choice,
                                              "messages": [{"role": "user", "content": "x"}]})


@pytest.mark.parametrize(("tools", "says"), [
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": 123}}}], "'f'"),
    ([TOOL, TOOL], "get_weather"),
    ([{"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "minLength": -1}}}}}], "'g'"),
])
def test_invalid_tool_schemas_are_refused_naming_the_tool(tools: list, says: str) -> None:
    from pensieve.errors import InvalidRequest
    for choice in ("auto", "none"):  # even when the tools are not offered
        with pytest.raises(InvalidRequest) as caught:
            _body(tools=tools, tool_choice=choice).tool_spec()
        assert says in str(caught.value)


def test_a_valid_schema_the_grammar_cannot_enforce_is_accepted() -> None:
    assert _spec().tools[1].name == "send_mail"  # "format": "email" is valid JSON Schema
