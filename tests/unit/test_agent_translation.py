"""Tools and thinking at the Anthropic and Ollama edges, without a model: requests read into
turns and tool specs, stream events rendered from generation events, /api/show capabilities."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from pensieve.api.anthropic.protocol import MessagesRequest
from pensieve.api.anthropic.routes import _Blocks
from pensieve.api.generation import (
    ReasoningDelta,
    TextDelta,
    ToolArgsDelta,
    ToolCallEvent,
    ToolCallStart,
    Turn,
)
from pensieve.api.ollama.capabilities import can_think, capabilities
from pensieve.api.ollama.protocol import ChatRequest, chat_turns
from pensieve.api.tools import ToolCall
from pensieve.errors import InvalidRequest

WEATHER = {"name": "get_weather", "description": "Weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
ASK = {"role": "user", "content": "Weather in Paris?"}


def _messages(**body: object) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 2048, **body})


# --- Anthropic requests ------------------------------------------------------------------------
def test_tool_use_and_tool_result_blocks_become_call_and_tool_turns() -> None:
    req = _messages(tools=[WEATHER], messages=[
        ASK,
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": ""},
            {"type": "text", "text": "Looking."},
            {"type": "tool_use", "id": "toolu_abc", "name": "get_weather",
             "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_abc",
             "content": [{"type": "text", "text": "18 C"}]},
            {"type": "text", "text": "And tomorrow?"}]}])
    turns = req.prompt().messages
    assert turns == (Turn("user", "Weather in Paris?"),
                     Turn("assistant", "Looking.",
                          (ToolCall("abc", "get_weather", '{"city": "Paris"}'),)),
                     Turn("tool", "18 C", tool_call_id="abc"),
                     Turn("user", "And tomorrow?"))


@pytest.mark.parametrize(("content", "is_error", "expected"), [
    ("sunny", False, "sunny"),
    ({"temp": 18}, False, '{"temp": 18}'),
    (None, False, ""),
    ("no such city", True, "Error: no such city"),
])
def test_tool_result_content_text_json_and_errors(content: object, is_error: bool,
                                                  expected: str) -> None:
    result = {"type": "tool_result", "tool_use_id": "toolu_x", "is_error": is_error,
              **({} if content is None else {"content": content})}
    req = _messages(messages=[ASK, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_x", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [result]}])
    assert req.prompt().messages[-1] == Turn("tool", expected, tool_call_id="x")


def test_tool_choice_maps_onto_the_tool_spec() -> None:
    def spec(choice: dict | None):  # noqa: ANN202
        return _messages(messages=[ASK], tools=[WEATHER], tool_choice=choice).tool_spec()

    assert spec(None).choice == "auto" and spec(None).parallel
    assert spec({"type": "any", "disable_parallel_tool_use": True}).choice == "required"
    assert not spec({"type": "any", "disable_parallel_tool_use": True}).parallel
    assert spec({"type": "tool", "name": "get_weather"}).choice == "get_weather"
    assert spec({"type": "none"}) is None


@pytest.mark.parametrize("body", [
    {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
    {"tools": [{"name": "bad name", "input_schema": {}}]},
    {"tool_choice": {"type": "any"}},
    {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "other"}},
    {"thinking": {"type": "enabled", "budget_tokens": 512}},
    {"thinking": {"type": "enabled"}},
    {"thinking": {"type": "enabled", "budget_tokens": 4096}},  # not under max_tokens
])
def test_bad_tools_and_thinking_are_refused(body: dict) -> None:
    with pytest.raises(ValidationError):
        _messages(messages=[ASK], **body)


def test_an_invalid_input_schema_is_a_400_naming_the_tool() -> None:
    bad = {**WEATHER, "input_schema": {"type": 123}}
    for choice in (None, {"type": "none"}):
        with pytest.raises(InvalidRequest) as err:
            _messages(messages=[ASK], tools=[bad], tool_choice=choice).to_generate()
        assert "get_weather" in err.value.message and err.value.param == "tools[0]"


def test_thinking_and_effort_reach_the_template() -> None:
    on = _messages(messages=[ASK], thinking={"type": "enabled", "budget_tokens": 1024},
                   output_config={"effort": "max"}).to_generate()
    assert dict(on.template_kwargs) == {"enable_thinking": True, "reasoning_effort": "high"}
    off = _messages(messages=[ASK], thinking={"type": "disabled"}).to_generate()
    assert dict(off.template_kwargs) == {"enable_thinking": False}
    assert dict(_messages(messages=[ASK]).to_generate().template_kwargs) == {}


def test_a_conversation_ending_in_an_unanswered_call_is_refused() -> None:
    req = _messages(messages=[ASK, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]}])
    with pytest.raises(InvalidRequest):
        req.prompt()


def test_a_prefilled_answer_with_thinking_is_refused() -> None:
    prefill = [ASK, {"role": "assistant", "content": "It is"}]
    assert _messages(messages=prefill).prompt().prefill == "It is"
    with pytest.raises(InvalidRequest):
        _messages(messages=prefill, thinking={"type": "adaptive"}).prompt()


def test_images_are_still_refused_inside_tool_results() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "AA=="}}
    req = _messages(messages=[ASK, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [image]}]}])
    with pytest.raises(InvalidRequest) as err:
        req.prompt()
    assert "image" in err.value.message


# --- Anthropic stream events -------------------------------------------------------------------
def _events(chunks: list[bytes]) -> list[dict]:
    return [json.loads(c.decode().split("data: ", 1)[1]) for c in chunks]


def test_blocks_open_and_close_in_order_with_argument_deltas() -> None:
    blocks = _Blocks()
    chunks: list[bytes] = []
    for event in [ReasoningDelta(0, "why"), TextDelta(0, "", [1]), TextDelta(0, "Hi", [2]),
                  ToolCallStart(0, 0, "call_1", "get_weather"), ToolArgsDelta(0, 0, '{"ci'),
                  ToolArgsDelta(0, 0, 'ty": "Oslo"}'),
                  ToolCallEvent(0, 0, ToolCall("call_1", "get_weather", '{"city": "Oslo"}'))]:
        chunks.extend(blocks.feed(event))
    chunks.extend(blocks.finish())
    kinds = [(e["type"], e.get("content_block", e.get("delta", {})).get("type"))
             for e in _events(chunks)]
    assert kinds == [("content_block_start", "thinking"), ("ping", None),
                     ("content_block_delta", "thinking_delta"),
                     ("content_block_delta", "signature_delta"), ("content_block_stop", None),
                     ("content_block_start", "text"), ("content_block_delta", "text_delta"),
                     ("content_block_stop", None),
                     ("content_block_start", "tool_use"),
                     ("content_block_delta", "input_json_delta"),
                     ("content_block_delta", "input_json_delta"), ("content_block_stop", None)]
    events = _events(chunks)
    assert [e["index"] for e in events if e["type"] == "content_block_start"] == [0, 1, 2]
    tool = events[8]["content_block"]
    assert tool == {"type": "tool_use", "id": "toolu_call_1", "name": "get_weather",
                    "input": {}}
    assert "".join(e["delta"]["partial_json"] for e in events[9:11]) == '{"city": "Oslo"}'


def test_a_reply_without_blocks_still_pings_once() -> None:
    kinds = [e["type"] for e in _events(_Blocks().finish())]
    assert kinds == ["ping"]


# --- Ollama ------------------------------------------------------------------------------------
def _chat(**body: object) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", **body})


def test_ollama_calls_without_ids_are_linked_to_their_results() -> None:
    req = _chat(messages=[
        ASK,
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "tool_name": "get_time", "content": "noon"},
        {"role": "tool", "content": "18 C"},
        {"role": "tool", "tool_call_id": "given", "content": "x"}])
    turns = chat_turns(req.messages)
    assert turns[1].tool_calls == (ToolCall("call_1_0", "get_weather", '{"city": "Paris"}'),
                                   ToolCall("call_1_1", "get_time", "{}"))
    assert [t.tool_call_id for t in turns[2:]] == ["call_1_1", "call_1_0", "given"]


def test_ollama_tools_are_offered_under_auto_and_validated() -> None:
    fn = {"name": "get_weather", "parameters": {"type": "object"}}
    spec = _chat(messages=[ASK], tools=[{"type": "function", "function": fn}]).tool_spec()
    assert spec is not None and spec.choice == "auto" and spec.tools[0].name == "get_weather"
    bad = {"type": "function", "function": {**fn, "parameters": {"type": 123}}}
    with pytest.raises(InvalidRequest) as err:
        _chat(messages=[ASK], tools=[bad]).tool_spec()
    assert "get_weather" in err.value.message
    with pytest.raises(InvalidRequest):
        chat_turns(_chat(messages=[{"role": "user", "content": "x", "tool_calls": [
            {"function": {"name": "f", "arguments": {}}}]}]).messages)


@pytest.mark.parametrize(("think", "kwargs"), [
    (None, {}), (False, {"enable_thinking": False}), (True, {"enable_thinking": True}),
    ("high", {"enable_thinking": True, "reasoning_effort": "high"}),
])
def test_ollama_think_reaches_the_template(think: object, kwargs: dict) -> None:
    assert _chat(messages=[ASK], think=think).template_kwargs() == kwargs


def test_think_on_a_template_without_reasoning_is_a_400() -> None:
    req = _chat(messages=[ASK], think=True)
    req.check_thinking("{{ messages }}{% if enable_thinking %}<think>{% endif %}")
    with pytest.raises(InvalidRequest):
        req.check_thinking("<|im_start|>{{ messages }}")
    _chat(messages=[ASK], think=False).check_thinking(None)


def test_capabilities_follow_the_gguf_and_the_template() -> None:
    llama = {"general.architecture": "llama"}
    assert capabilities("{{ messages }}", llama) == ["completion", "tools"]
    fim = {**llama, "tokenizer.ggml.fim_pre_token_id": 1, "tokenizer.ggml.fim_suf_token_id": 2,
           "tokenizer.ggml.fim_mid_token_id": 3}
    assert capabilities("<think>", fim) == ["completion", "tools", "insert", "thinking"]
    bert = {"general.architecture": "bert", "bert.pooling_type": 2}
    assert capabilities(None, bert) == ["embedding"]
    assert can_think("[THINK]") and not can_think(None)
