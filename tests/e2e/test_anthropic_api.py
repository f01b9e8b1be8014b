"""The Anthropic Messages API, driven by the official `anthropic` client against the real server,
and the same greedy answer through all three API families."""

from __future__ import annotations

import json
import uuid

import anthropic
import httpx
import ollama
import pytest
from openai import OpenAI

from tests.support.server import MODEL, Server

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Write one sentence about the sea."}]
EVENT_ORDER = ["message_start", "content_block_start", "ping", "content_block_delta",
               "content_block_stop", "message_delta", "message_stop"]
SDK_EVENT_ORDER = [e for e in EVENT_ORDER if e != "ping"]  # the SDK drops pings


def _client(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0,
                               timeout=120)


@pytest.fixture(scope="module")
def ac(server: Server) -> anthropic.Anthropic:
    return _client(server)


@pytest.fixture(scope="module")
def exact_ac(exact_server: Server) -> anthropic.Anthropic:
    """For tests that compare two greedy runs exactly: a server without memory."""
    return _client(exact_server)


def create(ac: anthropic.Anthropic, *, sampling: dict | None = None, **kwargs):
    """This SDK release no longer types temperature/top_p/top_k: they go in the body as is."""
    args = {"model": MODEL, "messages": HELLO, "max_tokens": 24,
            "extra_body": {"temperature": 0, **(sampling or {})}}
    return ac.messages.create(**{**args, **kwargs})


def test_message_answers_with_text_and_usage(ac: anthropic.Anthropic) -> None:
    m = create(ac, metadata={"user_id": "u-1"}, sampling={"top_k": 40, "top_p": 0.9})
    assert m.type == "message" and m.role == "assistant" and m.model == MODEL
    assert m.id.startswith("msg_")
    assert m.content[0].type == "text" and m.content[0].text.strip()
    assert m.stop_reason in ("end_turn", "max_tokens") and m.stop_sequence is None
    u = m.usage
    assert u.input_tokens + u.cache_read_input_tokens > 5
    assert 0 < u.output_tokens <= 24 and u.cache_creation_input_tokens == 0


def test_max_tokens_reports_max_tokens(ac: anthropic.Anthropic) -> None:
    m = create(ac, max_tokens=3)
    assert m.usage.output_tokens == 3 and m.stop_reason == "max_tokens"


def test_stop_sequence_is_reported(exact_ac: anthropic.Anthropic) -> None:
    ac = exact_ac
    base = create(ac, max_tokens=40).content[0].text
    words = base.split()
    assert len(words) > 4, base
    stop = " " + words[3]
    m = create(ac, max_tokens=40, stop_sequences=["never-appears-xyz", stop])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == base[: base.index(stop)]


def test_system_as_string_and_as_blocks_is_the_same_prompt(exact_ac: anthropic.Anthropic) -> None:
    ac = exact_ac
    text = "You are a pirate."
    a = create(ac, system=text)
    b = create(ac, system=[{"type": "text", "text": "You are "},
                           {"type": "text", "text": "a pirate.",
                            "cache_control": {"type": "ephemeral"}}])
    plain = create(ac)
    assert a.content[0].text == b.content[0].text
    total = [m.usage.input_tokens + m.usage.cache_read_input_tokens for m in (a, b, plain)]
    assert total[0] == total[1] != total[2]


def test_stream_has_the_sdk_event_sequence_and_equals_non_streamed(
        exact_ac: anthropic.Anthropic) -> None:
    ac = exact_ac
    full = create(ac)
    events = list(create(ac, stream=True))
    kinds = [e.type for e in events]
    collapsed = [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]
    assert collapsed == SDK_EVENT_ORDER
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == full.content[0].text
    delta = next(e for e in events if e.type == "message_delta")
    assert delta.delta.stop_reason == full.stop_reason
    assert delta.usage.output_tokens == full.usage.output_tokens


def test_raw_stream_is_server_sent_events_with_a_ping(server: Server) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/messages", json=body, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        names = [line.removeprefix("event: ") for line in r.iter_lines()
                 if line.startswith("event: ")]
    collapsed = [k for i, k in enumerate(names) if i == 0 or names[i - 1] != k]
    assert collapsed == EVENT_ORDER


def test_stream_helper_gives_the_final_message(exact_ac: anthropic.Anthropic) -> None:
    ac = exact_ac
    full = create(ac)
    args = {"model": MODEL, "messages": HELLO, "max_tokens": 24,
            "extra_body": {"temperature": 0}}
    with ac.messages.stream(**args) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == full.content[0].text == final.content[0].text
    assert final.stop_reason == full.stop_reason


def test_trailing_assistant_turn_is_continued(ac: anthropic.Anthropic) -> None:
    full = create(ac).content[0].text
    words = full.split()
    prefix = " ".join(words[:3])
    m = create(ac, messages=[*HELLO, {"role": "assistant", "content": prefix}])
    assert m.content[0].text.strip()
    assert (prefix + m.content[0].text).startswith(full[:40])


def test_count_tokens_matches_the_prompt_of_a_message(ac: anthropic.Anthropic) -> None:
    counted = ac.messages.count_tokens(model=MODEL, messages=HELLO, system="Be brief.")
    m = create(ac, system="Be brief.", max_tokens=2)
    assert counted.input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens


def test_images_and_invalid_tools_are_refused(ac: anthropic.Anthropic) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError) as err:
        create(ac, messages=[{"role": "user", "content": [image]}])
    assert "image" in err.value.message
    tool = {"name": "lookup", "description": "d", "input_schema": {"type": 123}}
    with pytest.raises(anthropic.BadRequestError) as err:
        create(ac, tools=[tool])
    assert "lookup" in err.value.message


def test_unknown_model_is_a_not_found_error(ac: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as err:
        create(ac, model="no-such-model")
    assert err.value.body["error"]["type"] == "not_found_error"


def test_a_continued_conversation_reads_from_memory(ac: anthropic.Anthropic) -> None:
    turn1 = [{"role": "user", "content": f"Remember {uuid.uuid4().hex[:8]}. Say ok."}]
    first = create(ac, messages=turn1)
    turn2 = [*turn1, {"role": "assistant", "content": first.content[0].text},
             {"role": "user", "content": "What did I ask you to remember?"}]
    second = create(ac, messages=turn2)
    prompt1 = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens >= prompt1 - 1
    assert second.usage.cache_read_input_tokens > first.usage.cache_read_input_tokens
    with ac.messages.stream(model=MODEL, messages=turn2, max_tokens=8,
                            extra_body={"temperature": 0}) as s:
        final = s.get_final_message()
    assert final.usage.cache_read_input_tokens >= prompt1 - 1


def test_same_greedy_text_through_openai_ollama_and_anthropic(
        exact_server: Server, exact_client: OpenAI, exact_ac: anthropic.Anthropic) -> None:
    client, ac = exact_client, exact_ac  # three runs compared exactly: a server without memory
    oc = ollama.Client(host=exact_server.base_url, timeout=120)
    via_openai = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24,
                                                temperature=0).choices[0].message.content
    via_ollama = oc.chat(model=MODEL, messages=HELLO,
                         options={"temperature": 0, "num_predict": 24}).message.content
    via_anthropic = create(ac).content[0].text
    assert via_openai.strip()
    assert via_openai == via_ollama == via_anthropic


def test_output_format_constrains_the_answer_to_the_schema(ac: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {"mood": {"enum": ["calm", "stormy"]}},
              "required": ["mood"], "additionalProperties": False}
    m = create(ac, max_tokens=40, extra_body={
        "temperature": 0, "output_config": {"format": {"type": "json_schema", "schema": schema}}})
    assert json.loads(m.content[0].text)["mood"] in {"calm", "stormy"}
