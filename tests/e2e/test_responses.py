"""The Responses API end to end with the official openai client: text, function tools and
their results through previous_response_id (under the generic convention and a Hermes-style
template), json_schema output, reasoning, stored responses across a restart, refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from openai import OpenAI
from openai.types.responses import Response

from tests.support.schemas import SCHEMAS
from tests.support.server import MODEL, Server, start_server, stop_server
from tests.support.templates import HERMES, WEATHER, create_model

pytestmark = pytest.mark.e2e

HERMES_MODEL = "responses-hermes"
TOOL = {"type": "function", **WEATHER}


@dataclass
class Live:
    """The module's server; the restart test replaces it with a new one on the same data."""

    server: Server
    tmp: Path

    @property
    def data(self) -> Path:
        return self.tmp / "data"

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.server.base_url}/v1", api_key="unused", max_retries=0,
                      timeout=120)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("responses")
    state = Live(start_server(tmp, "--parallel", "4", data_dir=tmp / "data"), tmp)
    create_model(state.server.base_url, HERMES_MODEL, MODEL, HERMES)
    yield state
    stop_server(state.server)


@pytest.fixture
def client(live: Live) -> OpenAI:
    return live.client()


def streamed(client: OpenAI, **kwargs: Any) -> tuple[Response, list[Any]]:
    """The final response of a streamed create, and every event before it."""
    events = list(client.responses.create(stream=True, **kwargs))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert events[0].response.id == events[-1].response.id
    return events[-1].response, events[:-1]


def create(client: OpenAI, stream: bool, **kwargs: Any) -> Response:
    return streamed(client, **kwargs)[0] if stream else client.responses.create(**kwargs)


def items_of(response: Response, kind: str) -> list[Any]:
    return [item for item in response.output if item.type == kind]


# --- text ------------------------------------------------------------------------------------


def test_a_text_answer_with_usage(client: OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=16,
                                temperature=0, instructions="You are friendly.")
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.status in ("completed", "incomplete") and r.output_text.strip()
    assert [item.type for item in r.output] == ["message"]
    assert r.instructions == "You are friendly."
    assert r.usage is not None and r.usage.input_tokens > 0
    assert 0 < r.usage.output_tokens <= 16
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_running_out_of_tokens_is_an_incomplete_response(client: OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="Tell me a long story about a dragon.",
                                max_output_tokens=4, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage is not None and r.usage.output_tokens == 4


def test_a_streamed_answer_sends_its_text_in_deltas_that_add_up(client: OpenAI) -> None:
    final, events = streamed(client, model=MODEL, input="Name three colors.",
                             max_output_tokens=24, temperature=0)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == final.output_text
    done = [e for e in events if e.type == "response.output_text.done"]
    assert len(done) == 1 and done[0].text == final.output_text
    kinds = [e.type for e in events]
    assert kinds.index("response.output_item.added") < kinds.index(
        "response.content_part.added") < kinds.index("response.output_text.delta")
    assert kinds[-2:] == ["response.content_part.done", "response.output_item.done"]


def test_the_sdk_stream_helper_assembles_the_same_response(client: OpenAI) -> None:
    """`responses.stream` checks the events' order and identities as it assembles them (a
    schema makes the answer end within the tokens: the helper wants `response.completed`)."""
    prompt, schema = SCHEMAS[0]
    fmt = {"type": "json_schema", "name": "person", "schema": schema, "strict": True}
    with client.responses.stream(model=MODEL, input=prompt, text={"format": fmt},
                                 max_output_tokens=128, temperature=0) as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.output_text == "".join(texts) and final.output_text
    jsonschema.validate(json.loads(final.output_text), schema)


def test_json_schema_output_follows_the_schema(client: OpenAI) -> None:
    prompt, schema = SCHEMAS[0]
    fmt = {"type": "json_schema", "name": "person", "schema": schema, "strict": True}
    for stream in (False, True):
        r = create(client, stream, model=MODEL, input=prompt, text={"format": fmt},
                   max_output_tokens=128, temperature=0)
        assert r.status == "completed"
        jsonschema.validate(json.loads(r.output_text), schema)
        assert r.text is not None and r.text.format.type == "json_schema"


# --- function tools --------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("model", [MODEL, HERMES_MODEL], ids=["generic", "hermes"])
def test_a_tool_loop_through_previous_response_id(client: OpenAI, model: str,
                                                  stream: bool) -> None:
    """A required call, its result as a function_call_output on the call's response, the
    answer, and a follow-up whose prompt begins with the whole earlier conversation."""
    first = create(client, stream, model=model, input="What is the weather in Paris?",
                   tools=[TOOL], tool_choice="required", parallel_tool_calls=False,
                   temperature=0, max_output_tokens=128)
    assert first.status == "completed"
    (call,) = items_of(first, "function_call")
    assert call.name == "get_weather" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id
    assert isinstance(json.loads(call.arguments)["city"], str)
    assert not items_of(first, "message")

    result = {"type": "function_call_output", "call_id": call.call_id,
              "output": json.dumps({"celsius": 21, "sky": "clear"})}
    answer = create(client, stream, model=model, previous_response_id=first.id,
                    input=[result], tools=[TOOL], tool_choice="none", temperature=0,
                    max_output_tokens=24)
    assert answer.previous_response_id == first.id
    assert answer.output_text.strip() and not items_of(answer, "function_call")

    follow_up = create(client, stream, model=model, previous_response_id=answer.id,
                       input="Thanks!", tools=[TOOL], tool_choice="none", temperature=0,
                       max_output_tokens=8)
    assert answer.usage is not None and follow_up.usage is not None
    cached = follow_up.usage.input_tokens_details.cached_tokens
    assert answer.usage.input_tokens <= cached < follow_up.usage.input_tokens

    listed = client.responses.input_items.list(follow_up.id, order="asc", limit=100)
    assert [(i.type, getattr(i, "role", None)) for i in listed.data] == [
        ("message", "user"), ("function_call", None), ("function_call_output", None),
        ("message", "assistant"), ("message", "user")]
    assert listed.data[1].call_id == listed.data[2].call_id == call.call_id


def test_streamed_call_arguments_come_in_several_deltas(client: OpenAI) -> None:
    final, events = streamed(client, model=HERMES_MODEL, input="Weather in Rome?",
                             tools=[TOOL], tool_choice="required", parallel_tool_calls=False,
                             temperature=0, max_output_tokens=128)
    (call,) = items_of(final, "function_call")
    added = [e for e in events if e.type == "response.output_item.added"]
    assert added[0].item.type == "function_call" and added[0].item.name == "get_weather"
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 1
    assert json.loads("".join(deltas)) == json.loads(call.arguments)
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == call.arguments and done.item_id == call.id


def test_reasoning_is_its_own_item_and_never_in_the_text(client: OpenAI) -> None:
    thinking = {"chat_template_kwargs": {"enable_thinking": True}}
    r = client.responses.create(model=HERMES_MODEL, input="Hi!", max_output_tokens=16,
                                temperature=0, reasoning={"effort": "low"},
                                extra_body=thinking)
    (reasoning,) = items_of(r, "reasoning")
    assert r.output[0].type == "reasoning" and reasoning.content
    text = reasoning.content[0].text
    assert text.strip() and "<think>" not in text and text not in r.output_text
    assert r.usage is not None and r.usage.output_tokens_details.reasoning_tokens > 0
    assert r.reasoning is not None and r.reasoning.effort == "low"
    final, events = streamed(client, model=HERMES_MODEL, input="Hi!", max_output_tokens=16,
                             temperature=0, extra_body=thinking)
    deltas = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
    assert "".join(deltas) == items_of(final, "reasoning")[0].content[0].text


# --- stored responses ------------------------------------------------------------------------


def test_retrieve_list_input_items_and_delete(client: OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="Hello there.", max_output_tokens=8,
                                temperature=0, metadata={"topic": "greeting"})
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text
    raw = client.responses.with_raw_response.retrieve(r.id).http_response.json()
    Response.model_validate(raw)  # every field the SDK's type requires, of its type
    assert got.metadata == {"topic": "greeting"}
    listed = client.responses.input_items.list(r.id)
    assert len(listed.data) == 1 and listed.data[0].content[0].text == "Hello there."
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)


def test_a_response_not_stored_cannot_be_continued(client: OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="Hi.", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model=MODEL, input="Again.", previous_response_id=r.id)
    assert err.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_an_unknown_previous_response_is_a_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model=MODEL, input="Hi.",
                                previous_response_id="resp_0123456789abcdef")
    assert err.value.body["code"] == "previous_response_not_found"  # type: ignore[index]


def test_a_bad_tool_schema_is_a_400_naming_the_tool(client: OpenAI) -> None:
    bad = {"type": "function", "name": "broken_tool", "parameters": {"type": 123}}
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input="Hi.", tools=[TOOL, bad])
    assert "broken_tool" in err.value.message


def test_other_tool_types_are_a_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input="Hi.", tools=[{"type": "web_search"}])
    assert "web_search" in err.value.message


def test_a_conversation_continues_after_a_restart_from_memory(live: Live) -> None:
    """previous_response_id after the server restarted on the same data dir: the response
    comes back from its file and the earlier turn's KV from the disk tier."""
    client = live.client()
    first = client.responses.create(model=MODEL, input="What is the capital of France?",
                                    instructions="Answer in one short sentence.",
                                    max_output_tokens=16, temperature=0)
    stop_server(live.server)
    live.server = start_server(live.tmp, "--parallel", "4", data_dir=live.data)
    client = live.client()
    assert client.responses.retrieve(first.id).output_text == first.output_text
    second = client.responses.create(model=MODEL, previous_response_id=first.id,
                                     input="And of Italy?",
                                     instructions="Answer in one short sentence.",
                                     max_output_tokens=16, temperature=0)
    assert first.usage is not None and second.usage is not None
    cached = second.usage.input_tokens_details.cached_tokens
    assert first.usage.input_tokens <= cached < second.usage.input_tokens
    texts = [i.content[0].text for i in client.responses.input_items.list(
        second.id, order="asc").data]
    assert texts == ["What is the capital of France?", first.output_text, "And of Italy?"]
