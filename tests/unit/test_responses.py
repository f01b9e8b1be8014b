"""The Responses API without the model: the response store (retention, atomic writes), input
items to chat turns, the request's translation, and the output and its stream events, checked
against the official openai SDK's own types."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai.types.responses import Response, ResponseItem, ResponseStreamEvent
from pydantic import TypeAdapter

from pensieve.api.app import create_app
from pensieve.api.generation import (
    Finish,
    Finished,
    ReasoningDelta,
    TextDelta,
    ToolArgsDelta,
    ToolCallEvent,
    ToolCallStart,
    Usage,
    render_prompt,
)
from pensieve.api.openai import responses_items as items
from pensieve.api.openai.responses import _Run
from pensieve.api.openai.responses_output import ResponseOutput
from pensieve.api.openai.responses_protocol import ResponsesRequest
from pensieve.api.openai.responses_store import (
    ResponseStore,
    ResponseStoreConfig,
    StoredResponse,
    is_response_id,
)
from pensieve.api.tools import ToolCall
from pensieve.engine.types import ModelInfo
from pensieve.errors import InvalidRequest
from pensieve.runtime import ModelRuntime
from tests.support.templates import HERMES, WEATHER

# --- the store -------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def stored(n: int, text: str = "hi") -> StoredResponse:
    rid = f"resp_{n:032x}"
    return StoredResponse({"id": rid, "object": "response", "output": []},
                          [items.message_item("user", text)])


def test_a_stored_response_is_read_back_by_a_new_store_on_the_same_directory(
        tmp_path: Path) -> None:
    config = ResponseStoreConfig(tmp_path / "responses")
    ResponseStore(config).save(stored(1, "hello"))
    again = ResponseStore(config).get(stored(1).id)
    assert again is not None and again.input[0]["content"][0]["text"] == "hello"
    assert [p.name for p in (tmp_path / "responses").iterdir()] == [f"{stored(1).id}.json"]


def test_the_oldest_responses_go_first_beyond_the_count_limit(tmp_path: Path) -> None:
    clock = Clock()
    store = ResponseStore(ResponseStoreConfig(tmp_path, max_count=3), clock)
    for n in range(5):
        clock.now += 1
        store.save(stored(n))
    assert store.ids() == [stored(n).id for n in (2, 3, 4)]
    assert store.get(stored(0).id) is None and store.get(stored(4).id) is not None
    assert len(list(tmp_path.glob("resp_*.json"))) == 3


def test_the_count_limit_holds_for_what_a_previous_run_left(tmp_path: Path) -> None:
    store = ResponseStore(ResponseStoreConfig(tmp_path, max_count=10))
    for n in range(4):
        store.save(stored(n))
    smaller = ResponseStore(ResponseStoreConfig(tmp_path, max_count=2))
    assert len(smaller) == 2 and len(list(tmp_path.glob("resp_*.json"))) == 2


def test_responses_older_than_the_age_limit_are_gone(tmp_path: Path) -> None:
    clock = Clock()
    store = ResponseStore(ResponseStoreConfig(tmp_path, max_age_s=100.0), clock)
    store.save(stored(1))
    clock.now += 60
    store.save(stored(2))
    assert store.get(stored(1).id) is not None
    clock.now += 50  # the first is 110 s old, the second 50 s
    assert store.get(stored(1).id) is None and store.get(stored(2).id) is not None
    assert not (tmp_path / f"{stored(1).id}.json").exists()


def test_max_count_zero_keeps_nothing(tmp_path: Path) -> None:
    store = ResponseStore(ResponseStoreConfig(tmp_path, max_count=0))
    store.save(stored(1))
    assert store.get(stored(1).id) is None and not list(tmp_path.iterdir())


def test_delete_removes_the_file(tmp_path: Path) -> None:
    store = ResponseStore(ResponseStoreConfig(tmp_path))
    store.save(stored(1))
    assert store.delete(stored(1).id) and not store.delete(stored(1).id)
    assert store.get(stored(1).id) is None and not list(tmp_path.iterdir())


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    store = ResponseStore(ResponseStoreConfig(tmp_path))
    store.save(stored(1, "first"))

    def crash(src: Any, dst: Any) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr("pensieve.store.store.os.replace", crash)
    with pytest.raises(OSError):
        store.save(stored(1, "second"))
    monkeypatch.undo()
    kept = ResponseStore(ResponseStoreConfig(tmp_path)).get(stored(1).id)
    assert kept is not None and kept.input[0]["content"][0]["text"] == "first"
    assert not list(tmp_path.glob(".*tmp*"))  # the interrupted write's file is cleaned up


def test_a_damaged_file_is_not_served(tmp_path: Path) -> None:
    store = ResponseStore(ResponseStoreConfig(tmp_path))
    store.save(stored(1))
    (tmp_path / f"{stored(1).id}.json").write_text('{"response": ')
    assert ResponseStore(ResponseStoreConfig(tmp_path)).get(stored(1).id) is None


def test_ids_that_are_not_response_ids_never_reach_the_file_system() -> None:
    assert is_response_id("resp_abc123")
    for bad in ("../resp_x", "resp_../../etc", "resp_", "msg_abc", "resp_a/b"):
        assert not is_response_id(bad)


def test_without_a_directory_responses_are_kept_in_memory() -> None:
    store = ResponseStore(ResponseStoreConfig(None, max_count=1))
    second = stored(2)
    store.save(stored(1))
    store.save(second)
    assert store.get(stored(1).id) is None and store.get(second.id) == second


# --- input items to turns --------------------------------------------------------------------


def request(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "hi", **fields})


CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather",
        "arguments": '{"city": "Paris"}'}
OUTPUT = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}


def test_a_string_input_is_one_user_message_after_the_instructions() -> None:
    body = request(instructions="Be brief.")
    turns = items.to_turns(body.input_items(), body.instructions)
    assert [(t.role, t.content) for t in turns] == [("system", "Be brief."), ("user", "hi")]


def test_messages_take_strings_and_text_parts_and_developer_is_a_system_turn() -> None:
    body = request(input=[
        {"role": "developer", "content": "Rules."},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "c",
                                           "annotations": []}]}])
    new = body.input_items()
    assert all(it["id"].startswith("msg_") for it in new)
    assert [(t.role, t.content) for t in items.to_turns(new)] == [
        ("system", "Rules."), ("user", "ab"), ("assistant", "c")]


def test_text_before_calls_and_the_calls_are_one_assistant_turn_with_their_ids() -> None:
    second = {**CALL, "call_id": "call_2", "arguments": '{"city": "Rome"}'}
    body = request(input=[
        {"role": "user", "content": "weather?"},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text",
                                                          "text": "think"}]},
        {"role": "assistant", "content": "Checking."}, CALL, second, OUTPUT,
        {**OUTPUT, "call_id": "call_2", "output": [{"type": "input_text", "text": "rain"}]}])
    turns = items.to_turns(body.input_items())
    assert [t.role for t in turns] == ["user", "assistant", "tool", "tool"]
    assert turns[1].content == "Checking."
    assert turns[1].tool_calls == (ToolCall("call_1", "get_weather", '{"city": "Paris"}'),
                                   ToolCall("call_2", "get_weather", '{"city": "Rome"}'))
    assert (turns[2].tool_call_id, turns[2].content) == ("call_1", "sunny")
    assert (turns[3].tool_call_id, turns[3].content) == ("call_2", "rain")


def test_an_output_for_a_call_never_made_is_a_400() -> None:
    with pytest.raises(InvalidRequest) as err:
        items.to_turns(request(input=[OUTPUT]).input_items())
    assert "call_1" in err.value.message and err.value.param == "input[0]"


@pytest.mark.parametrize(("field", "value", "param"), [
    ("input", [{"role": "user", "content": [{"type": "input_image",
                                             "image_url": "x"}]}], "input[0]"),
    ("input", [{"type": "web_search_call", "id": "ws_1"}], "input[0]"),
    ("input", [OUTPUT, {"type": "item_reference", "id": "msg_1"}], "input[1]"),
])
def test_unsupported_input_is_a_400_naming_the_item(field: str, value: Any,
                                                    param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        request(**{field: value}).input_items()
    assert err.value.param == param
    assert "not supported" in err.value.message or "text-only" in err.value.message


def test_input_items_page_in_either_order() -> None:
    its = [items.message_item("user", str(n), f"msg_{n}") for n in range(5)]
    first = items.page(its, order="asc", limit=2, after=None)
    assert [d["id"] for d in first["data"]] == ["msg_0", "msg_1"] and first["has_more"]
    assert (first["first_id"], first["last_id"]) == ("msg_0", "msg_1")
    rest = items.page(its, order="asc", limit=10, after="msg_1")
    assert [d["id"] for d in rest["data"]] == ["msg_2", "msg_3", "msg_4"]
    assert not rest["has_more"]
    newest = items.page(its, order="desc", limit=1, after=None)
    assert newest["data"][0]["id"] == "msg_4"
    for item in its:
        TypeAdapter(ResponseItem).validate_python(item)


# --- the request's translation ---------------------------------------------------------------


def tool(**overrides: Any) -> dict[str, Any]:
    return {"type": "function", **WEATHER, **overrides}


def test_a_tool_whose_parameters_are_not_a_schema_is_a_400_naming_it_even_with_none() -> None:
    for choice in ("auto", "none"):
        body = request(tools=[tool(name="bad_tool", parameters={"type": 123})],
                       tool_choice=choice)
        with pytest.raises(InvalidRequest) as err:
            body.tool_spec()
        assert "bad_tool" in err.value.message


def test_other_tool_types_are_a_400_naming_them() -> None:
    body = request(tools=[tool(), {"type": "web_search"}])
    with pytest.raises(InvalidRequest) as err:
        body.tool_spec()
    assert err.value.param == "tools[1]" and "web_search" in err.value.message


def test_tool_choice_maps_to_the_spec() -> None:
    assert request(tools=[tool()]).tool_spec().choice == "auto"  # type: ignore[union-attr]
    assert request(tools=[tool()], tool_choice="none").tool_spec() is None
    named = request(tools=[tool()], tool_choice={"type": "function", "name": "get_weather"},
                    parallel_tool_calls=False).tool_spec()
    assert named is not None and named.choice == "get_weather" and not named.parallel
    with pytest.raises(InvalidRequest):
        request(tools=[tool()], tool_choice={"type": "function", "name": "other"}).tool_spec()


def test_format_reasoning_and_sampling_reach_the_generation_request() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = request(text={"format": {"type": "json_schema", "name": "x", "schema": schema,
                                    "strict": True}},
                   reasoning={"effort": "low"}, max_output_tokens=7, temperature=0)
    gen = body.to_generate(items.to_turns(body.input_items()))
    assert gen.response_format is not None and gen.response_format.schema == schema
    assert gen.template_kwargs == {"reasoning_effort": "low"}
    assert gen.params.max_tokens == 7 and gen.params.temperature == 0
    assert {"max_tokens", "temperature"} <= gen.sent and "top_p" not in gen.sent
    assert gen.id_prefix == "resp_"


@pytest.mark.parametrize("fields", [{"background": True}, {"conversation": "conv_1"},
                                    {"top_logprobs": 3}])
def test_what_is_not_supported_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as err:
        request(**fields).check_supported()
    assert err.value.param == next(iter(fields))


def test_unknown_include_values_are_refused_known_ones_accepted() -> None:
    request(include=["reasoning.encrypted_content", "message.output_text.logprobs"])
    with pytest.raises(ValueError, match="include"):
        request(include=["everything"])


# --- a follow-up renders the earlier turns as before ------------------------------------------


def info(template: str | None) -> ModelInfo:
    return ModelInfo("m.gguf", "m", 0, 0, 4096, 4096, 4096, 1, 100, template, "<s>",
                     "<|im_end|>", False, 0.0)


@pytest.mark.parametrize("template", [None, HERMES], ids=["generic", "hermes"])
@pytest.mark.parametrize("choice", ["auto", "none"])
def test_the_previous_prompt_is_a_prefix_of_the_follow_up(template: str | None,
                                                          choice: str) -> None:
    """Turn 2 (a call's result after the call) and turn 3 (a new question after turn 2's
    answer): turn 2's prompt text is where turn 3's begins, so its KV is reused."""
    first = request(input="Weather in Paris?", tools=[tool()], instructions="Be brief.")
    call = {**CALL, "id": "fc_1", "status": "completed"}
    conversation = [*first.input_items(), call]
    second = request(input=[OUTPUT], tools=[tool()], tool_choice=choice,
                     instructions="Be brief.")
    turn2 = [*conversation, *second.input_items()]
    answer = items.message_item("assistant", "It is sunny.")
    third = request(input="And tomorrow?", tools=[tool()], tool_choice=choice,
                    instructions="Be brief.")
    turn3 = [*turn2, answer, *third.input_items()]

    def prompt(body: ResponsesRequest, conv: list[dict[str, Any]]) -> str:
        req = body.to_generate(items.to_turns(conv, body.instructions))
        return render_prompt(info(template), req.prompts[0], req.tools)

    two, three = prompt(second, turn2), prompt(third, turn3)
    assert three.startswith(two)
    assert "sunny" in two and "And tomorrow?" in three[len(two):]


# --- the output and its events, as the SDK reads them -----------------------------------------

STREAM_EVENT = TypeAdapter(ResponseStreamEvent)


def scripted_output(events: list[Any]) -> tuple[ResponseOutput, list[dict[str, Any]]]:
    out = ResponseOutput()
    wire: list[dict[str, Any]] = []
    for event in events:
        wire.extend(out.feed(event))
    for n, event in enumerate(wire):
        STREAM_EVENT.validate_python({**event, "sequence_number": n})
    return out, wire


def test_reasoning_text_and_a_call_become_three_items_in_order() -> None:
    call = ToolCall("call_9", "get_weather", '{"city": "Paris"}')
    out, wire = scripted_output([
        ReasoningDelta(0, "Let me "), ReasoningDelta(0, "think."),
        TextDelta(0, "", [5]), TextDelta(0, "Checking", [6]), TextDelta(0, ".", [7]),
        ToolCallStart(0, 0, "call_9", "get_weather"), ToolArgsDelta(0, 0, '{"city": '),
        ToolArgsDelta(0, 0, '"Paris"}'), ToolCallEvent(0, 0, call),
        Finished(0, Finish.TOOL_CALLS)])
    assert [it["type"] for it in out.items] == ["reasoning", "message", "function_call"]
    reasoning, message, fc = out.items
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Let me think."}]
    assert message["content"][0]["text"] == "Checking."
    assert (fc["call_id"], fc["name"], fc["arguments"]) == ("call_9", "get_weather",
                                                            call.arguments)
    assert all(it["status"] == "completed" for it in out.items)
    kinds = [e["type"] for e in wire]
    assert kinds[:3] == ["response.output_item.added", "response.content_part.added",
                         "response.reasoning_text.delta"]
    assert kinds.count("response.output_text.delta") == 2
    assert kinds.count("response.function_call_arguments.delta") == 2
    assert kinds[-2:] == ["response.function_call_arguments.done",
                          "response.output_item.done"]
    assert [e["output_index"] for e in wire if e["type"] == "response.output_item.done"] == \
        [0, 1, 2]
    args = "".join(e["delta"] for e in wire
                   if e["type"] == "response.function_call_arguments.delta")
    assert json.loads(args) == json.loads(call.arguments)


def test_running_out_of_tokens_leaves_the_message_incomplete() -> None:
    out, wire = scripted_output([TextDelta(0, "Once upon", [1]),
                                 Finished(0, Finish.LENGTH)])
    assert out.items[0]["status"] == "incomplete" and out.finish is Finish.LENGTH
    assert wire[-1]["item"]["content"][0]["text"] == "Once upon"


def fake_run(body: ResponsesRequest, out: ResponseOutput) -> _Run:
    gen = SimpleNamespace(request_id="resp_" + "a" * 32, model="m",
                          usage=Usage(num_prompt_tokens=30, num_cached_tokens=20,
                                      num_output_tokens=5, num_reasoning_tokens=2))
    run = _Run(gen, body, [], ResponseStore(ResponseStoreConfig(None)))  # type: ignore[arg-type]
    run.output = out
    return run


@pytest.mark.parametrize("finish", [Finish.END, Finish.LENGTH, Finish.TOOL_CALLS])
def test_the_response_object_is_valid_for_the_sdk(finish: Finish) -> None:
    body = request(tools=[tool()], tool_choice={"type": "function", "name": "get_weather"},
                   text={"format": {"type": "json_schema", "name": "x",
                                    "schema": {"type": "object"}}},
                   reasoning={"effort": "high"}, metadata={"k": "v"}, instructions="Hi.")
    out, _ = scripted_output([TextDelta(0, "{}", [1]), Finished(0, finish)])
    raw = fake_run(body, out).response()
    parsed = Response.model_validate(raw)
    assert parsed.output_text == "{}"
    assert parsed.usage is not None and parsed.usage.input_tokens_details.cached_tokens == 20
    assert parsed.usage.output_tokens_details.reasoning_tokens == 2
    if finish is Finish.LENGTH:
        assert parsed.status == "incomplete"
        assert parsed.incomplete_details is not None
        assert parsed.incomplete_details.reason == "max_output_tokens"
    else:
        assert parsed.status == "completed" and parsed.incomplete_details is None
    assert parsed.tools[0].name == "get_weather"  # type: ignore[union-attr]


def test_a_running_response_has_no_output_yet() -> None:
    parsed = Response.model_validate(fake_run(request(), ResponseOutput()).response())
    assert parsed.status == "in_progress" and parsed.output == [] and parsed.usage is None


# --- the routes, without a model -------------------------------------------------------------


@pytest.fixture
def http(tmp_path: Path) -> TestClient:
    app = create_app(ModelRuntime(), responses_store=ResponseStoreConfig(tmp_path))
    return TestClient(app)  # no lifespan: no worker is started


def saved(http: TestClient, n: int, num_items: int) -> StoredResponse:
    conversation = [items.message_item("user", str(k)) for k in range(num_items)]
    response = {**stored(n).response, "output": []}
    entry = StoredResponse(response, conversation)
    http.app.state.responses.save(entry)  # type: ignore[attr-defined]
    return entry


def test_stored_responses_are_retrieved_listed_and_deleted(http: TestClient) -> None:
    entry = saved(http, 1, 5)
    assert http.get(f"/v1/responses/{entry.id}").json() == entry.response
    page = http.get(f"/v1/responses/{entry.id}/input_items",
                    params={"order": "asc", "limit": 2}).json()
    assert [d["content"][0]["text"] for d in page["data"]] == ["0", "1"] and page["has_more"]
    rest = http.get(f"/v1/responses/{entry.id}/input_items",
                    params={"order": "asc", "after": page["last_id"]}).json()
    assert [d["content"][0]["text"] for d in rest["data"]] == ["2", "3", "4"]
    newest = http.get(f"/v1/responses/{entry.id}/input_items").json()  # desc by default
    assert newest["data"][0]["content"][0]["text"] == "4"
    deleted = http.delete(f"/v1/responses/{entry.id}")
    assert deleted.json() == {"id": entry.id, "object": "response.deleted", "deleted": True}
    assert http.get(f"/v1/responses/{entry.id}").status_code == 404


@pytest.mark.parametrize("path", ["/v1/responses/resp_nothere", "/v1/responses/..%2Fx",
                                  "/v1/responses/resp_nothere/input_items"])
def test_unknown_responses_are_a_404_in_openai_shape(http: TestClient, path: str) -> None:
    r = http.get(path)
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert http.delete("/v1/responses/resp_nothere").status_code == 404


def test_an_unknown_previous_response_is_a_404_before_any_model_is_needed(
        http: TestClient) -> None:
    r = http.post("/v1/responses", json={"model": "m", "input": "hi",
                                         "previous_response_id": "resp_nothere"})
    assert r.status_code == 404
    assert r.json()["error"]["param"] == "previous_response_id"
    assert r.json()["error"]["code"] == "previous_response_not_found"


@pytest.mark.parametrize(("body", "needle"), [
    ({"tools": [{"type": "function", "name": "bad_tool", "parameters": {"type": 123}}]},
     "bad_tool"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "file_search"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "item_reference"),
    ({"background": True}, "background"),
    ({"truncation": "sometimes"}, "truncation"),
    ({"input": []}, "input"),
])
def test_requests_pensieve_cannot_serve_are_a_400_naming_why(http: TestClient,
                                                            body: dict[str, Any],
                                                            needle: str) -> None:
    r = http.post("/v1/responses", json={"model": "m", "input": "hi", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"] or needle in (error["param"] or "")
