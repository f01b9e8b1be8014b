"""Tool loops and reasoning on the OpenAI chat API with the official `openai` client, under
templates in each model-native tool style (tests/support/templates.py) and under the default
template (Pensieve's generic convention): the real model writes each format's calls, and the
parsers meet them as real streamed tokens."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import BadRequestError, OpenAI

from tests.support.server import MODEL, Server
from tests.support.templates import HERMES, NATIVE, WEATHER

pytestmark = pytest.mark.e2e

TOOLS = [{"type": "function", "function": WEATHER}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
STYLES = [*NATIVE, "generic"]


@pytest.fixture(scope="module")
def srv(exact_server: Server) -> Server:
    return exact_server


@pytest.fixture(scope="module")
def oa(srv: Server) -> OpenAI:
    return OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _model(style: str) -> str:
    return MODEL if style == "generic" else f"{style}-tools"


def _streamed_call(oa: OpenAI, model: str, messages: list, **kwargs) -> dict:
    """One streamed reply: its content, reasoning, calls (as the client assembles them) and
    how many chunks each call's arguments came in."""
    out: dict = {"content": "", "calls": {}, "arg_chunks": {}, "finish": None}
    stream = oa.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                        temperature=0, max_tokens=80, stream=True, **kwargs)
    for chunk in stream:
        choice = chunk.choices[0]
        out["content"] += choice.delta.content or ""
        for tc in choice.delta.tool_calls or ():
            call = out["calls"].setdefault(tc.index, {"id": None, "name": None, "args": ""})
            call["id"] = tc.id or call["id"]
            if tc.function and tc.function.name:
                call["name"] = tc.function.name
            if tc.function and tc.function.arguments:
                call["args"] += tc.function.arguments
                out["arg_chunks"][tc.index] = out["arg_chunks"].get(tc.index, 0) + 1
        out["finish"] = choice.finish_reason or out["finish"]
    return out


@pytest.mark.parametrize("style", STYLES)
def test_a_full_tool_loop_streamed_and_not(oa: OpenAI, style: str) -> None:
    model = _model(style)
    streamed = _streamed_call(oa, model, ASK, tool_choice="required")
    assert streamed["finish"] == "tool_calls" and streamed["content"] == ""
    call = streamed["calls"][0]
    assert call["name"] == "get_weather" and isinstance(json.loads(call["args"])["city"], str)
    assert streamed["arg_chunks"][0] > 1  # arguments stream as they are generated
    whole = oa.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                       tool_choice="required", temperature=0, max_tokens=80)
    msg = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls"
    assert msg.tool_calls is not None and msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == json.loads(call["args"])
    history = [*ASK, {"role": "assistant", "content": None,
                      "tool_calls": [{"id": call["id"], "type": "function",
                                      "function": {"name": "get_weather",
                                                   "arguments": call["args"]}}]},
               {"role": "tool", "tool_call_id": call["id"], "content": '{"temp_c": 18}'}]
    final = oa.chat.completions.create(model=model, messages=history, tools=TOOLS,
                                       tool_choice="none", temperature=0, max_tokens=40)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    # The result turn reached the model: the prompt grew by it (and the call) over the ask.
    asked = oa.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=1)
    assert asked.usage and final.usage
    assert final.usage.prompt_tokens > asked.usage.prompt_tokens + 8


@pytest.mark.parametrize("style", ["hermes", "mistral"])
def test_auto_streams_text_while_tools_are_offered(oa: OpenAI, style: str) -> None:
    """Under `auto` the model writes text freely (a lazy grammar waits for a call to open);
    the text arrives in many chunks, not held to the end."""
    stream = oa.chat.completions.create(
        model=_model(style), tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=30,
        stream=True, messages=[{"role": "user", "content": "Say hello to me in a sentence."}])
    pieces = [c.choices[0].delta.content for c in stream
              if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3, pieces
    assert "<tool_call>" not in "".join(pieces)


def test_named_tool_and_parallel_calls_in_the_hermes_style(oa: OpenAI) -> None:
    other = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string", "maxLength": 8}},
        "required": ["tz"]}}}
    r = oa.chat.completions.create(model="hermes-tools", messages=ASK, tools=[*TOOLS, other],
                                   tool_choice={"type": "function",
                                                "function": {"name": "get_time"}},
                                   temperature=0, max_tokens=60)
    calls = r.choices[0].message.tool_calls
    assert calls and {c.function.name for c in calls} == {"get_time"}
    assert all("tz" in json.loads(c.function.arguments) for c in calls)


def test_reasoning_is_split_from_content(oa: OpenAI, srv: Server) -> None:
    """A reply that reasons first (forced here by a raw grammar) keeps its reasoning out of
    the answer, streamed and not; reasoning_format "none" keeps it raw."""
    grammar = 'root ::= "<think>" [a-z ]{5,30} "</think>" [a-z ]{5,30}'
    args = {"model": MODEL, "messages": ASK, "temperature": 0, "max_tokens": 60}
    whole = httpx.post(f"{srv.base_url}/v1/chat/completions",
                       json={**args, "grammar": grammar}, timeout=120).json()
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"] and "<think>" not in message["content"]
    assert "</think>" not in message["reasoning_content"]
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    stream = oa.chat.completions.create(**args, stream=True, extra_body={"grammar": grammar})
    content = reasoning = ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reasoning += getattr(delta, "reasoning_content", None) or ""
    assert (content, reasoning) == (message["content"], message["reasoning_content"])
    raw = httpx.post(f"{srv.base_url}/v1/chat/completions", timeout=120,
                     json={**args, "grammar": grammar, "reasoning_format": "none"}).json()
    text = raw["choices"][0]["message"]["content"]
    # The split drops the white space around the reasoning and before the answer.
    inner, _, answer = text.removeprefix("<think>").partition("</think>")
    assert (inner.strip(), answer.lstrip()) == (reasoning, content)


def test_enable_thinking_opens_reasoning_in_the_template(oa: OpenAI) -> None:
    """`chat_template_kwargs` reach the template: HERMES opens `<think>` in the generation
    prompt, so what the model writes (up to `</think>`, which this model never writes) is
    reasoning, never content."""
    args = {"model": "hermes-tools", "messages": ASK, "temperature": 0, "max_tokens": 12}
    plain = oa.chat.completions.create(**args)
    thinking = oa.chat.completions.create(
        **args, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert plain.choices[0].message.content
    assert thinking.choices[0].message.content == ""
    assert getattr(thinking.choices[0].message, "reasoning_content", "")
    assert thinking.usage and plain.usage
    assert thinking.usage.prompt_tokens > plain.usage.prompt_tokens


@pytest.mark.parametrize("body", [
    {"tools": [{"type": "function", "function": {"name": "bad", "parameters": {"type": 123}}}]},
    {"tools": [{"type": "function", "function": {"name": "bad", "parameters": {
        "type": "object", "properties": {"x": {"minLength": "two"}}}}}], "tool_choice": "none"},
    {"tools": TOOLS * 2},
    {"chat_template_kwargs": {"messages": []}},
], ids=["type-123", "bad-keyword-under-none", "duplicate-names", "reserved-kwarg"])
def test_bad_tool_definitions_are_400s_naming_the_tool(oa: OpenAI, body: dict) -> None:
    with pytest.raises(BadRequestError) as caught:
        oa.chat.completions.create(model=MODEL, messages=ASK, extra_body=body, max_tokens=4)
    err = caught.value.body
    assert isinstance(err, dict)
    assert "bad" in err["message"] or "get_weather" in err["message"] \
        or "messages" in err["message"]


def test_hermes_template_sees_the_tools(oa: OpenAI) -> None:
    """The native template renders the tool list itself: the prompt grows by it, and
    `tool_choice: none` hides it again."""
    def prompt_tokens(**kwargs: object) -> int:
        r = oa.chat.completions.create(model="hermes-tools", messages=ASK, max_tokens=1,
                                       temperature=0, **kwargs)  # type: ignore[call-overload]
        assert r.usage
        return int(r.usage.prompt_tokens)
    bare = prompt_tokens()
    assert prompt_tokens(tools=TOOLS, tool_choice="none") == bare
    assert prompt_tokens(tools=TOOLS, tool_choice="auto") > bare + 20
    assert "<tools>" in HERMES
