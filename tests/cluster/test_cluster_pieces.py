"""Cluster mode's parts that need no running cluster: step messages, errors as data, each
replica's own disk tier, counters added up, the settings' shape of a deployment. (Routing:
test_cluster_routing.py; a real two-node cluster: tests/cluster/.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from pensieve.cluster.backend import hints_for, sum_counters
from pensieve.cluster.messages import RemoteError
from pensieve.cluster.options import ClusterOptions
from pensieve.cluster.replica import _per_step, own_config
from pensieve.config import Settings
from pensieve.engine.types import EngineRequest, RequestAccepted, SamplingParams, SeqOutput
from pensieve.errors import InvalidRequest, Overloaded, WorkerCrashed


def test_outputs_of_one_step_travel_as_one_message() -> None:
    steps = [[RequestAccepted("r", 3)],
             [SeqOutput("r", 0, "a"), SeqOutput("r", 1, "b")],
             [SeqOutput("r", 0, "c"), SeqOutput("r", 1, "d")]]
    closed: list[bool] = []

    async def engine() -> AsyncGenerator[RequestAccepted | SeqOutput, None]:
        try:
            for step in steps:
                for item in step:
                    yield item
                await asyncio.sleep(0.01)  # the next step comes later
        finally:
            closed.append(True)

    async def read() -> list[list[object]]:
        return [m async for m in _per_step(engine())]

    messages = asyncio.run(read())
    assert messages == steps
    assert closed == [True]


def test_an_engine_error_ends_the_stream_as_data_and_a_hang_up_aborts() -> None:
    aborted: list[bool] = []

    async def failing() -> AsyncGenerator[RequestAccepted | SeqOutput, None]:
        yield RequestAccepted("r", 3)
        raise InvalidRequest("too long", param="messages", code="prompt_too_long")

    async def endless() -> AsyncGenerator[RequestAccepted | SeqOutput, None]:
        try:
            while True:
                yield SeqOutput("r", 0, "x")
                await asyncio.sleep(0.01)
        finally:
            aborted.append(True)

    async def scenario() -> list[list[object]]:
        got = [m async for m in _per_step(failing())]
        stream = _per_step(endless())
        await anext(stream)
        await stream.aclose()  # Serve cancelled the call: the engine's stream is closed
        return got

    got = asyncio.run(scenario())
    error = got[-1][-1]
    assert isinstance(error, RemoteError)
    exc = error.to_exception()
    assert isinstance(exc, InvalidRequest) and exc.code == "prompt_too_long"
    assert exc.param == "messages" and exc.status_code == 400
    assert aborted == [True]


def test_remote_errors_come_back_as_the_same_types() -> None:
    crash = RemoteError.of(WorkerCrashed("gone", code="worker_crashed")).to_exception()
    assert isinstance(crash, WorkerCrashed) and crash.status_code == 503
    busy = RemoteError.of(Overloaded("full", code="queue_full")).to_exception()
    assert isinstance(busy, Overloaded) and busy.headers == {"Retry-After": "1"}
    assert RemoteError("SomethingNew", "?").to_exception().status_code == 500


def test_each_replica_keeps_its_disk_tier_apart(tmp_path: Path) -> None:
    config = Settings(data_dir=tmp_path).engine_config("m.gguf", "sha256:" + "0" * 64)
    assert config.memory is not None and config.memory.disk_dir is not None
    a, b = own_config(config, "aaa"), own_config(config, "bbb")
    assert a.memory is not None and b.memory is not None
    assert a.memory.disk_dir != b.memory.disk_dir
    assert Path(str(a.memory.disk_dir)).is_relative_to(Path(config.memory.disk_dir))


def test_counters_of_replicas_add_up() -> None:
    total = sum_counters([{"hits": {"ram": 1, "disk": 2}, "misses": 3, "kind": "x"},
                          {"hits": {"ram": 4}, "misses": 1, "kind": "y", "new": 2}])
    assert total == {"hits": {"ram": 5, "disk": 2}, "misses": 4, "kind": "x", "new": 2}


def test_requests_carry_their_session_and_prompt_blocks() -> None:
    text = EngineRequest("r", SamplingParams(), prompt="p" * 600, session_id="s")
    tokens = EngineRequest("r", SamplingParams(), prompt_tokens=tuple(range(130)))
    assert hints_for(text).session_id == "s" and len(hints_for(text).prefix_hashes) == 2
    assert hints_for(tokens).session_id is None and len(hints_for(tokens).prefix_hashes) == 2


def test_settings_shape_the_deployment() -> None:
    fixed = Settings(cluster="127.0.0.1:6379", replicas=2, threads=1, parallel=4,
                     max_queue=8).cluster_options()
    assert fixed == ClusterOptions("127.0.0.1:6379", 2, None, None, 1, 1.0, 4, 4 + 8 + 8)
    assert not fixed.is_autoscaling
    scaled = Settings(cluster="auto", replicas=2, replicas_min=1, replicas_max=4,
                      max_replicas_per_node=0).cluster_options()
    assert scaled.max_replicas_per_node is None
    assert scaled.autoscaling_config()["min_replicas"] == 1
    assert scaled.autoscaling_config()["max_replicas"] == 4
    assert scaled.autoscaling_config()["initial_replicas"] == 2
    with pytest.raises(ValueError, match="above"):
        Settings(cluster="auto", replicas_min=3, replicas_max=2)
    assert Settings(cluster="  ").cluster is None
