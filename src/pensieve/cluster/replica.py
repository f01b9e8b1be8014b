"""One Ray Serve replica: a local `EngineClient` inside a Serve deployment.

Everything a single server has applies inside the replica unchanged: the worker process and
its crash handling, the request limits, the memory tiers (the disk tier in a directory of the
replica's own, so replicas sharing a box never share files). The replica streams a request as
one message per engine step (every output the step produced for it), never one per token.

Errors go back as `RemoteError` data, raised again at the ingress as the same type.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import ray
from ray import serve

from pensieve.cluster.messages import RemoteError, ReplicaStatus
from pensieve.cluster.routing import RoutingHints
from pensieve.engine.backend import RequestOutputs
from pensieve.engine.client import EngineClient
from pensieve.engine.config import ClientLimits, EngineConfig
from pensieve.engine.types import (
    EmbedResult,
    EngineRequest,
    MemoryResult,
    ModelInfo,
    RequestAccepted,
    SeqOutput,
)
from pensieve.errors import NotFound, PensieveError
from pensieve.logs import setup_logging

log = logging.getLogger("pensieve.cluster.replica")

StepMessage = list[SeqOutput | RequestAccepted | RemoteError]
T = TypeVar("T")
_END = object()


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """What every replica of a model is built from (sent to each by Serve)."""

    name: str
    config: EngineConfig
    limits: ClientLimits
    log_level: int = logging.INFO
    log_format: str = "text"


def own_config(config: EngineConfig, replica_id: str) -> EngineConfig:
    """The config with the disk tier in a directory of this replica's own."""
    memory = config.memory
    if memory is None or memory.disk_dir is None:
        return config
    disk_dir = str(Path(memory.disk_dir) / "replicas" / replica_id)
    return dataclasses.replace(config, memory=dataclasses.replace(memory, disk_dir=disk_dir))


class EngineReplica:
    """The Serve deployment class (cluster/deployment.py wraps it)."""

    async def __init__(self, spec: ReplicaSpec) -> None:  # type: ignore[misc]  # Serve awaits it
        setup_logging(logging.getLevelName(spec.log_level).lower(), spec.log_format)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.client = EngineClient(spec.name, own_config(spec.config, self.replica_id),
                                   log_level=spec.log_level, limits=spec.limits)
        self.info = await self.client.ensure_started()  # ready only once the model is loaded
        log.info("replica %s (pid %d, node %s) serving %s", self.replica_id, os.getpid(),
                 self.node_ip, spec.name)

    # --- generation ----------------------------------------------------------------------------
    async def generate(self, request: EngineRequest, hints: RoutingHints
                       ) -> AsyncIterator[StepMessage]:
        """The request's outputs, one message per engine step. Serve cancels this generator
        when the ingress's client hangs up; closing the client's stream aborts the request."""
        outputs = self.client.generate(request)
        async for message in _per_step(outputs):
            yield [dataclasses.replace(item, replica=self.replica_id)
                   if isinstance(item, RequestAccepted) else item for item in message]

    def record_routing_stats(self) -> dict[str, int]:
        """Serve's router reads this between its own queue-length probes."""
        return {"num_in_flight": self.client.num_in_flight}

    # --- one request, one answer --------------------------------------------------------------
    async def model_info(self) -> ModelInfo:
        return await self.client.ensure_started()

    async def tokenize(self, text: str, add_special: bool) -> list[int] | RemoteError:
        return await _answer(self.client.tokenize(text, add_special))

    async def detokenize(self, tokens: list[int]) -> str | RemoteError:
        return await _answer(self.client.detokenize(tokens))

    async def embed(self, inputs: list[str | list[int]], truncate: bool
                    ) -> EmbedResult | RemoteError:
        return await _answer(self.client.embed(inputs, truncate=truncate))

    async def memory(self, delete: bool, key: str | None, hints: RoutingHints
                     ) -> MemoryResult | RemoteError:
        if (refusal := self._refuse_other(hints)) is not None:
            return refusal
        return await _answer(self.client.memory(delete=delete, key=key))

    async def status(self, hints: RoutingHints) -> ReplicaStatus | RemoteError:
        if (refusal := self._refuse_other(hints)) is not None:
            return refusal
        client, stats = self.client, self.client.stats
        return ReplicaStatus(
            self.replica_id, self.node_id, self.node_ip, os.getpid(), client.pid,
            "ready" if client.is_running else "not loaded", client.num_in_flight,
            stats.num_running, stats.num_waiting, stats.num_restarts, stats.memory)

    def _refuse_other(self, hints: RoutingHints) -> RemoteError | None:
        """A request pinned to another replica (that one died meanwhile) is refused."""
        if hints.replica is None or hints.replica == self.replica_id:
            return None
        return RemoteError.of(NotFound(f"Replica {hints.replica} is gone.",
                                       code="replica_gone"))

    async def __del__(self) -> None:  # Serve calls it on a graceful stop
        await self.client.stop()


async def _answer(call: Awaitable[T]) -> T | RemoteError:
    try:
        return await call
    except PensieveError as exc:
        return RemoteError.of(exc)


async def _per_step(outputs: RequestOutputs) -> AsyncIterator[StepMessage]:
    """Group a request's outputs by the step that made them: all outputs of one step reach
    the client's queue in one event-loop callback, so whatever is queued when the first one
    is read belongs together (and a slow ingress gets several steps in one message)."""
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in outputs:
                queue.put_nowait(item)
        except PensieveError as exc:
            queue.put_nowait(RemoteError.of(exc))
        finally:
            queue.put_nowait(_END)

    task = asyncio.create_task(pump())
    try:
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            finished = items[-1] is _END
            message = [i for i in items if i is not _END]
            if message:
                yield message  # type: ignore[misc]
            if finished:
                return
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
