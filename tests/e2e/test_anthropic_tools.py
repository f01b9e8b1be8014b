"""Tools and thinking on the Anthropic Messages API, driven by the official `anthropic` client
the way Claude Code drives it (streamed, tool_use -> tool_result -> answer), against the real
model served under a Hermes-style template (native `<tool_call>` output) and under its own
template (Pensieve's generic convention)."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import pytest

from tests.support.server import MODEL, Server, start_server, stop_server
from tests.support.templates import HERMES, WEATHER, create_model

pytestmark = pytest.mark.e2e

HERMES_MODEL = "hermes-tools"
MODELS = {"hermes": HERMES_MODEL, "generic": MODEL}
TOOL = {"name": WEATHER["name"], "description": WEATHER["description"],
        "input_schema": WEATHER["parameters"]}
ASK = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def srv(exact_server: Server) -> Server:
    return exact_server


def _client(srv: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.base_url, api_key="unused", max_retries=0,
                               timeout=120)


@pytest.fixture(scope="module")
def ac(srv: Server) -> anthropic.Anthropic:
    return _client(srv)


def _stream(ac: anthropic.Anthropic, **kwargs: object) -> tuple[list, anthropic.types.Message]:
    """The raw events of one streamed message, and the message the SDK built from them."""
    with ac.messages.stream(**{"max_tokens": 200, "extra_body": GREEDY, **kwargs}) as stream:
        events = [e for e in stream if e.type in
                  ("content_block_start", "content_block_delta", "content_block_stop")]
        return events, stream.get_final_message()


def _assert_blocks_do_not_overlap(events: list) -> None:
    """Each block starts, gets its deltas and stops before the next one starts."""
    open_index = None
    for e in events:
        if e.type == "content_block_start":
            assert open_index is None, "a block started while another was open"
            open_index = e.index
        elif e.type == "content_block_delta":
            assert e.index == open_index
        else:
            assert e.index == open_index
            open_index = None
    assert open_index is None


def _blocks(message: anthropic.types.Message, kind: str) -> list:
    return [b for b in message.content if b.type == kind]


def _tool_loop(ac: anthropic.Anthropic, model: str) -> tuple[anthropic.types.Message,
                                                             anthropic.types.Message]:
    """A forced call streamed, its result sent back the way Claude Code does, and the reply
    streamed: both messages, checked."""
    events, first = _stream(ac, model=model, messages=ASK, tools=[TOOL],
                            tool_choice={"type": "any", "disable_parallel_tool_use": True})
    _assert_blocks_do_not_overlap(events)
    assert first.stop_reason == "tool_use"
    (call,) = _blocks(first, "tool_use")
    assert call.id.startswith("toolu_") and call.name == "get_weather"
    assert isinstance(call.input, dict) and isinstance(call.input["city"], str)
    index = next(e.index for e in events if e.type == "content_block_start"
                 and e.content_block.type == "tool_use")
    pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta"
              and e.index == index and e.delta.type == "input_json_delta"]
    assert len(pieces) > 1, pieces  # the arguments stream as they are generated
    assert json.loads("".join(pieces)) == call.input

    result = {"type": "tool_result", "tool_use_id": call.id,
              "content": [{"type": "text", "text": '{"temperature_c": 18, "sky": "clear"}'}]}
    history = [*ASK, {"role": "assistant",
                      "content": [b.model_dump(exclude_none=True) for b in first.content]},
               {"role": "user", "content": [result]}]
    events, second = _stream(ac, model=model, messages=history, tools=[TOOL],
                             tool_choice={"type": "auto"}, max_tokens=60)
    _assert_blocks_do_not_overlap(events)
    calls, texts = _blocks(second, "tool_use"), _blocks(second, "text")
    assert (second.stop_reason == "tool_use") == bool(calls)
    assert calls or "".join(t.text for t in texts).strip()
    assert not any("<tool_call>" in t.text for t in texts)
    return first, second


@pytest.mark.parametrize("fmt", ["hermes", "generic"])
def test_claude_code_style_tool_loop_streamed(ac: anthropic.Anthropic, fmt: str) -> None:
    _tool_loop(ac, MODELS[fmt])


def test_a_tool_loop_reads_its_first_turn_from_memory(
        default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """With memory (the default; `srv` has none), the reply's prompt begins with the first
    one: the Hermes template renders every tool_choice alike, so the first prompt's KV is
    reused."""
    server = start_server(tmp_path_factory.mktemp("anthropic-memory"), "--ctx-size", "8192")
    try:
        create_model(server.base_url, HERMES_MODEL, MODEL, HERMES)
        first, second = _tool_loop(_client(server), HERMES_MODEL)
    finally:
        stop_server(server)
    prompt1 = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens >= prompt1 - 1


def test_named_tool_choice_answers_with_a_tool_use_block(ac: anthropic.Anthropic) -> None:
    choice = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    m = ac.messages.create(model=HERMES_MODEL, max_tokens=200, messages=ASK, tools=[TOOL],
                           tool_choice=choice, extra_body=GREEDY)
    assert m.stop_reason == "tool_use"
    (call,) = _blocks(m, "tool_use")
    assert call.name == "get_weather" and call.id.startswith("toolu_")
    assert isinstance(call.input["city"], str)
    assert not _blocks(m, "text")


def test_thinking_comes_in_thinking_blocks_never_in_text(ac: anthropic.Anthropic) -> None:
    args = {"model": HERMES_MODEL, "max_tokens": 1100,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "messages": [{"role": "user", "content": "Is 17 a prime number?"}]}
    whole = ac.messages.create(**args, extra_body=GREEDY)
    events, streamed = _stream(ac, **args)
    _assert_blocks_do_not_overlap(events)
    for m in (whole, streamed):
        (thinking,) = _blocks(m, "thinking")
        assert thinking.thinking.strip() and thinking.signature == ""
        assert m.content[0].type == "thinking"
        for t in _blocks(m, "text"):
            assert "<think>" not in t.text and "</think>" not in t.text
    assert streamed.content[0].thinking == whole.content[0].thinking
    deltas = [e.delta.type for e in events if e.type == "content_block_delta"
              and e.index == 0]
    assert "thinking_delta" in deltas and deltas[-1] == "signature_delta"


def test_thinking_blocks_sent_back_are_dropped_from_the_prompt(ac: anthropic.Anthropic) -> None:
    def count(assistant: list) -> int:
        return ac.messages.count_tokens(model=HERMES_MODEL, messages=[
            *ASK, {"role": "assistant", "content": assistant},
            {"role": "user", "content": "Thanks."}]).input_tokens

    text = {"type": "text", "text": "It is sunny."}
    thought = {"type": "thinking", "thinking": "The user wants weather.", "signature": ""}
    assert count([thought, text]) == count([text])


def test_tools_count_in_the_prompt(ac: anthropic.Anthropic) -> None:
    plain = ac.messages.count_tokens(model=HERMES_MODEL, messages=ASK).input_tokens
    offered = ac.messages.count_tokens(model=HERMES_MODEL, messages=ASK,
                                       tools=[TOOL]).input_tokens
    assert offered > plain + 10


def test_a_tool_with_an_invalid_schema_is_a_400_naming_it(ac: anthropic.Anthropic) -> None:
    bad = {**TOOL, "input_schema": {"type": 123}}
    for choice in ({"type": "auto"}, {"type": "none"}):
        with pytest.raises(anthropic.BadRequestError) as err:
            ac.messages.create(model=MODEL, max_tokens=8, messages=ASK, tools=[bad],
                               tool_choice=choice)
        assert "get_weather" in err.value.message
        assert err.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError) as err:
        ac.messages.create(model=MODEL, max_tokens=8, messages=ASK,
                           tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert "web_search_20250305" in err.value.message
