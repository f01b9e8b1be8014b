"""The Serve adapter of the routing policy (pensieve/cluster/router.py), with fake replicas:
the hints a call carries reach the policy, its order becomes Serve's ranks, loads come from
Serve's queue-length cache or the replicas' own stats, routed prompts are remembered."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from ray.serve._private.common import (
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
)
from ray.serve.request_router import PendingRequest

from pensieve.cluster.router import ConversationRouter
from pensieve.cluster.routing import RoutingHints, block_hashes, hrw_order

DEPLOYMENT = DeploymentID(name="EngineReplica", app_name="pensieve-test")


@dataclass
class FakeReplica:
    replica_id: ReplicaID
    routing_stats: dict[str, Any] = field(default_factory=dict)
    max_ongoing_requests: int = 100


def replicas(*ids: str) -> list[FakeReplica]:
    return [FakeReplica(ReplicaID(i, DEPLOYMENT)) for i in ids]


def call(hints: RoutingHints, *, as_keyword: bool = True) -> PendingRequest:
    args, kwargs = ([], {"hints": hints}) if as_keyword else (["request", hints], {})
    return PendingRequest(args=args, kwargs=kwargs, metadata=None)  # type: ignore[arg-type]


def ranks(router: ConversationRouter, candidates: list[FakeReplica],
          request: PendingRequest | None) -> list[list[str]]:
    loop = asyncio.get_event_loop()
    chosen = loop.run_until_complete(
        router.choose_replicas(candidates, request))  # type: ignore[arg-type]
    return [[r.replica_id.unique_id for r in rank] for rank in chosen]


@pytest.fixture()
def router() -> Iterator[ConversationRouter]:
    loop = asyncio.new_event_loop()  # Serve's router and pending requests live on a loop
    asyncio.set_event_loop(loop)
    made = ConversationRouter(deployment_id=DEPLOYMENT,
                              handle_source=DeploymentHandleSource.UNKNOWN)
    made.initialize_state(max_queue=4)
    yield made
    asyncio.set_event_loop(None)
    loop.close()


def test_a_session_goes_to_its_owner_first_one_replica_per_rank(
        router: ConversationRouter) -> None:
    expected = hrw_order("conv-1", ["a", "b", "c"])
    for as_keyword in (True, False):
        request = call(RoutingHints(session_id="conv-1"), as_keyword=as_keyword)
        assert ranks(router, replicas("a", "b", "c"), request) == [[i] for i in expected]
        assert request.routing_context.should_backoff  # every rank offered: back off next


def test_loads_come_from_serves_cache_then_the_replicas_stats(
        router: ConversationRouter) -> None:
    owner, second, third = hrw_order("conv-2", ["a", "b", "c"])
    candidates = replicas("a", "b", "c")
    router.replica_queue_len_cache.update(ReplicaID(owner, DEPLOYMENT), 9)
    order = ranks(router, candidates, call(RoutingHints(session_id="conv-2")))
    assert order == [[second], [third], [owner]]  # the overloaded owner goes last
    router.replica_queue_len_cache.invalidate_key(ReplicaID(owner, DEPLOYMENT))
    next(r for r in candidates if r.replica_id.unique_id == second).routing_stats = {
        "num_in_flight": 7}
    order = ranks(router, candidates, call(RoutingHints(session_id="conv-2")))
    assert order == [[owner], [third], [second]]


def test_routed_prompts_are_remembered_and_a_dead_replicas_forgotten(
        router: ConversationRouter) -> None:
    hints = RoutingHints(prefix_hashes=block_hashes("z" * 2048))
    router.on_request_routed(call(hints), ReplicaID("b", DEPLOYMENT), result=None)
    assert ranks(router, replicas("a", "b", "c"), call(hints))[0] == ["b"]
    router.on_replica_actor_died(ReplicaID("b", DEPLOYMENT))
    assert router.policy.prefixes.num_blocks("b", hints.prefix_hashes) == 0


def test_admin_calls_reach_the_replica_they_name(router: ConversationRouter) -> None:
    assert ranks(router, replicas("a", "b"), call(RoutingHints(replica="b"))) == [["b"]]
    assert ranks(router, replicas("a", "b"), None)  # a call without hints still routes
