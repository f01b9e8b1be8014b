"""The conversation a request belongs to reaches the engine backend (a cluster routes by it),
and the replica that accepted it comes back as `X-Pensieve-Replica`: through the real app,
with a fake backend that records what it was sent."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from pensieve.api.app import create_app
from pensieve.engine.backend import EngineStats, RequestOutputs
from pensieve.engine.config import ClientLimits
from pensieve.engine.types import (
    EngineRequest,
    FinishReason,
    ModelInfo,
    RequestAccepted,
    SeqOutput,
)
from pensieve.runtime import ModelRuntime, ServedModel

INFO = ModelInfo("fake.gguf", "fake", 1, 1, 2048, 2048, 2048, 4, 100, None, "<s>", "</s>",
                 False, 0.0)


class FakeBackend:
    """Answers every request with "ok" from `replica`, keeping the requests it was sent."""

    def __init__(self, replica: str | None) -> None:
        self.replica = replica
        self.name = "fake"
        self.limits = ClientLimits()
        self.observer = None
        self.info: ModelInfo | None = INFO
        self.stats = EngineStats()
        self.num_in_flight = 0
        self.load_seconds = None
        self.last_active = time.monotonic()
        self.before_start = self.after_start = None
        self.sent: list[EngineRequest] = []
        self.is_running = True
        self.pid = None

    def touch(self) -> None:
        self.last_active = time.monotonic()

    async def ensure_started(self) -> ModelInfo:
        return INFO

    async def stop(self) -> None:
        pass

    async def generate(self, request: EngineRequest) -> RequestOutputs:
        self.sent.append(request)
        yield RequestAccepted(request.request_id, 3, replica=self.replica)
        yield SeqOutput(request.request_id, 0, "ok", [1], finish_reason=FinishReason.STOP,
                        num_prompt_tokens=3, num_output_tokens=1)


def http_for(backend: FakeBackend) -> Iterator[TestClient]:
    runtime = ModelRuntime()
    runtime._models["fake"] = ServedModel("fake", backend)  # type: ignore[arg-type]
    with TestClient(create_app(runtime)) as http:
        yield http


@pytest.fixture()
def cluster() -> FakeBackend:
    return FakeBackend("replica-7")


@pytest.fixture()
def http(cluster: FakeBackend) -> Iterator[TestClient]:
    yield from http_for(cluster)


def chat(http: TestClient, headers: dict[str, str] | None = None, **fields: object
         ) -> tuple[int, dict[str, str]]:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], **fields}
    r = http.post("/v1/chat/completions", json=body, headers=headers or {})
    return r.status_code, dict(r.headers)


def test_the_session_header_reaches_the_backend_and_the_replica_comes_back(
        http: TestClient, cluster: FakeBackend) -> None:
    status, headers = chat(http, {"X-Session-Id": "conv-1"})
    assert status == 200
    assert cluster.sent[-1].session_id == "conv-1"
    assert headers["x-pensieve-replica"] == "replica-7"
    status, headers = chat(http, {"X-Session-Id": "conv-1"}, stream=True)
    assert status == 200 and headers["x-pensieve-replica"] == "replica-7"


def test_openai_user_names_the_session_and_the_header_wins(http: TestClient,
                                                           cluster: FakeBackend) -> None:
    chat(http, user="alice")
    assert cluster.sent[-1].session_id == "alice"
    chat(http, {"X-Session-Id": "conv-2"}, user="alice")
    assert cluster.sent[-1].session_id == "conv-2"
    chat(http)
    assert cluster.sent[-1].session_id is None
    chat(http, {"X-Session-Id": "has space"})  # not a sane id: ignored, not an error
    assert cluster.sent[-1].session_id is None


def test_a_responses_chain_keeps_its_first_responses_id_as_session(
        http: TestClient, cluster: FakeBackend) -> None:
    first = http.post("/v1/responses", json={"model": "fake", "input": "hi"}).json()
    assert cluster.sent[-1].session_id == first["id"]
    second = http.post("/v1/responses", json={"model": "fake", "input": "more",
                                              "previous_response_id": first["id"]}).json()
    assert cluster.sent[-1].session_id == first["id"]
    http.post("/v1/responses", json={"model": "fake", "input": "and more",
                                     "previous_response_id": second["id"]})
    assert cluster.sent[-1].session_id == first["id"]


def test_a_local_engine_names_no_replica() -> None:
    local = FakeBackend(None)
    for http in http_for(local):
        status, headers = chat(http, {"X-Session-Id": "conv-1"})
        assert status == 200 and "x-pensieve-replica" not in headers
        assert local.sent[-1].session_id == "conv-1"  # a hint it may ignore
