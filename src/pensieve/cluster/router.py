"""Ray Serve's side of conversation-affine routing: a `RequestRouter` that orders replicas with
`AffinityPolicy` (cluster/routing.py, where the logic and its tests are).

Serve makes one router per deployment handle, in the ingress process. `choose_replicas`
returns one rank per replica in the policy's order; Serve sends the request to the first rank
whose replica has room (queue below `max_ongoing_requests`), and backs off and asks again
when none has. Routing is per request (no FIFO mixin): a replica chosen for one conversation
is never handed to another request that happened to be waiting.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from pensieve.cluster.routing import AffinityPolicy, ReplicaLoad, RoutingHints

NO_HINTS = RoutingHints()


def hints_of(request: PendingRequest | None) -> RoutingHints:
    """The hints the backend passed as the call's `hints` (keyword or last positional)."""
    if request is None:
        return NO_HINTS
    found = request.kwargs.get("hints")
    if found is None and request.args:
        found = request.args[-1]
    return found if isinstance(found, RoutingHints) else NO_HINTS


class ConversationRouter(RequestRouter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.policy = AffinityPolicy()  # until initialize_state brings the deployment's bound
        super().__init__(*args, **kwargs)

    def initialize_state(self, max_queue: int = 32, max_hashes: int = 8192, **_: Any) -> None:
        self.policy = AffinityPolicy(max_queue, max_hashes)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = [ReplicaLoad(uid, self._load(r)) for uid, r in by_id.items()]
        order = self.policy.order(hints_of(pending_request), loads)
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all ranks were offered
        return [[by_id[uid]] for uid in order]

    def _load(self, replica: RunningReplica) -> int | None:
        """Requests in flight: Serve's cached queue length, else the replica's last stats."""
        queue_len = self.replica_queue_len_cache.get(replica.replica_id)
        if queue_len is not None:
            return int(queue_len)
        num = (replica.routing_stats or {}).get("num_in_flight")
        return num if isinstance(num, int) else None

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: object) -> None:
        self.policy.routed(hints_of(pending_request), replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        self.policy.replica_gone(replica_id.unique_id)
        super().on_replica_actor_died(replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.policy.keep_only(r.replica_id.unique_id for r in replicas)
