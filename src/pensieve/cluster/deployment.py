"""Connect to a Ray cluster and deploy, find and delete a model's Serve application.

Each served model is one Serve application, `pensieve-<model>`, with one deployment of
`EngineReplica`s routed by `ConversationRouter`. Pensieve's own FastAPI app stays the ingress
(in the `pensieve serve` process), so Serve's HTTP proxies are not started. The calls here block
(Ray's API is synchronous): the backend runs them in a thread.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import ReplicaID

from pensieve.cluster.options import ClusterOptions
from pensieve.cluster.replica import EngineReplica, ReplicaSpec
from pensieve.cluster.router import ConversationRouter

log = logging.getLogger("pensieve.cluster")

DEPLOYMENT = "EngineReplica"
ROUTING_STATS_PERIOD_S = 1.0


class ClusterUnavailable(RuntimeError):
    """The Ray cluster could not be reached (start refuses with this)."""


def connect(options: ClusterOptions) -> None:
    """Join the cluster as a driver and make sure Serve runs there (without HTTP proxies)."""
    try:
        ray.init(address=options.address, namespace="pensieve", log_to_driver=False,
                 ignore_reinit_error=True, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterUnavailable(
            f"cannot reach the Ray cluster at {options.address!r}: {exc}. Start one with "
            "`ray start --head` (it prints the address) on this machine or another one, "
            "then join this machine to it with `ray start --address HOST:PORT`.") from exc
    serve.start(proxy_location="Disabled")


def app_name(model: str) -> str:
    return "pensieve-" + re.sub(r"[^A-Za-z0-9._-]+", "-", model)


def deploy(spec: ReplicaSpec, options: ClusterOptions) -> DeploymentHandle[Any]:
    """Deploy (or update) the model's application; returns once its replicas are ready,
    which is once each has loaded the model."""
    scaling: dict[str, Any] = (
        {"autoscaling_config": options.autoscaling_config()} if options.is_autoscaling
        else {"num_replicas": options.num_replicas})
    if options.max_replicas_per_node is not None:
        scaling["max_replicas_per_node"] = options.max_replicas_per_node
    router = {"request_router_class": ConversationRouter,
              "request_router_kwargs": {"max_queue": options.max_queue},
              "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S}
    deployment = serve.deployment(
        name=DEPLOYMENT, **scaling, ray_actor_options={"num_cpus": options.replica_cpus},
        max_ongoing_requests=options.max_ongoing, health_check_period_s=2.0,
        graceful_shutdown_timeout_s=10.0, request_router_config=router)(EngineReplica)
    log.info("deploying %s on the Ray cluster (%s)", app_name(spec.name),
             scaling.get("autoscaling_config") or f"{options.num_replicas} replicas")
    handle: DeploymentHandle[Any] = serve.run(deployment.bind(spec), name=app_name(spec.name),
                                         route_prefix=None)
    return handle


def delete(model: str) -> None:
    serve.delete(app_name(model))


def replica_ids(model: str) -> list[str]:
    """The ids of the model's live replicas (Serve names each replica's actor after its id)."""
    ids = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"] if isinstance(actor, dict) else str(actor)
        if not ReplicaID.is_full_id_str(name):
            continue
        replica = ReplicaID.from_full_id_str(name)
        if replica.deployment_id.app_name == app_name(model) \
                and replica.deployment_id.name == DEPLOYMENT:
            ids.append(replica.unique_id)
    return sorted(ids)
